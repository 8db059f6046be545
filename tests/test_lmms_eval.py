"""lmms-eval runs our checkpoint through the package's model class (entry point `modeling_multimodal`) on local
JSONL tasks made from our manifests; its scores and predictions equal our own `evaluate_task`'s on the same rows.

lmms-eval exits 0 even after "Error during evaluation", so the test reads its results file, not its exit code.
Needs lmms-eval (scripts/setup_eval.sh); skipped without it.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_multimodal.data import ExampleEncoder, load_manifest
from modeling_multimodal.demo_data import make_demo_data
from modeling_multimodal.evaluation.tasks import evaluate_task, generate_responses, pair_log_likelihoods, split_prompt_response
from modeling_multimodal.integrations.lmms_eval import content_to_prompt, manifest_to_lmms_eval_task, prompt_to_content
from modeling_multimodal.training.mixture import load_rows
from modeling_multimodal.training.model_builder import build_model_and_processor
from modeling_multimodal.training.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_test.yaml"


def test_prompt_string_round_trips_chat_content_and_names_a_media_count_mismatch():
    content = [{"type": "image", "image": "a.png"}, {"type": "text", "text": "and"}, {"type": "audio", "audio": "b.wav"},
               {"type": "text", "text": "what is it?"}]
    prompt, media = content_to_prompt(content)
    assert (prompt, media) == ("<image> and <audio> what is it?", ["a.png", "b.wav"])
    assert prompt_to_content(prompt, media, "doc 0") == content
    with pytest.raises(ValueError, match="doc 3: doc_to_visual gave 1 media but the prompt has 2 placeholders"):
        prompt_to_content("<image> <audio>", ["a.png"], "doc 3")


def test_multiple_choice_manifest_refuses_an_answer_outside_its_choices(tmp_path):
    manifest = tmp_path / "mc.jsonl"
    manifest.write_text(json.dumps({"id": "q1", "messages": [{"role": "user", "content": "pick"}], "choices": ["a", "b"], "answer": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"row 'q1': answer 'c' is not one of \['a', 'b'\]"):
        manifest_to_lmms_eval_task(manifest, tmp_path / "tasks", "multiple_choice")


@pytest.mark.slow
def test_lmms_eval_scores_equal_our_evaluate_on_the_same_rows(tmp_path):
    pytest.importorskip("lmms_eval")
    root = tmp_path / "data"
    sizes = {"image": {"train": 4, "validation": 0, "test": 4}, "speech": {"train": 4, "validation": 0, "test": 4},
             "video": {"train": 0, "validation": 0, "test": 0}}
    make_demo_data(root, seed=0, sizes=sizes)
    recipe = load_recipe(RECIPE, [f"data.root={root}", "data.train=[{manifest: image_train.jsonl, task: image_caption}]", "data.eval=[]"])
    torch.manual_seed(0)
    model, processor = build_model_and_processor(recipe, load_rows(recipe, recipe.data.train))
    model.eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)

    tasks = tmp_path / "tasks"
    image_rows = list(load_manifest(root / "image_test.jsonl", root=root, task="image_caption"))
    speech_rows = list(load_manifest(root / "speech_test.jsonl", root=root, task="speech_transcription"))
    manifest_to_lmms_eval_task(root / "image_test.jsonl", tasks, "caption", "image_caption", root, name="mm_caption")
    manifest_to_lmms_eval_task(root / "speech_test.jsonl", tasks, "transcription", "speech_transcription", root, name="mm_asr")
    # multiple choice: each image with the 4 test captions as choices, its own caption the answer
    captions = [row["caption"] for row in image_rows]
    mc_rows = [{"id": row["id"], "messages": [{"role": "user", "content": [{"type": "image", "image": row["image"]},
                {"type": "text", "text": "which caption fits?"}]}], "choices": captions, "answer": i} for i, row in enumerate(image_rows)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc_rows))
    manifest_to_lmms_eval_task(root / "mc.jsonl", tasks, "multiple_choice", None, root, name="mm_mc")

    out = tmp_path / "results"
    command = [sys.executable, "-m", "lmms_eval", "--model", "modeling_multimodal", "--model_args", f"pretrained={checkpoint}",
               "--tasks", "mm_caption,mm_asr,mm_mc", "--include_path", str(tasks), "--output_path", str(out), "--log_samples",
               "--batch_size", "4"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    results_files = sorted(out.rglob("*results*.json"))
    assert results_files, f"lmms-eval wrote no results file (exit {run.returncode}):\n{run.stderr[-4000:]}"
    results = json.loads(results_files[-1].read_text())["results"]

    ours_caption, _ = evaluate_task(model, processor, image_rows, "image_caption", retrieval=False)
    ours_asr, _ = evaluate_task(model, processor, speech_rows, "speech_transcription", retrieval=False)
    assert results["mm_caption"]["exact_match,none"] == pytest.approx(ours_caption["exact_match"])
    assert results["mm_caption"]["bleu,none"] == pytest.approx(ours_caption["bleu"])
    assert results["mm_asr"]["wer,none"] == pytest.approx(ours_asr["wer"])
    assert results["mm_asr"]["cer,none"] == pytest.approx(ours_asr["cer"])
    assert ours_asr["wer"] > 0  # an untrained model: a real, non-trivial number compared

    # the per-sample predictions lmms-eval logged are ours, row by row
    samples = [json.loads(line) for f in out.rglob("*mm_asr*.jsonl") for line in f.read_text().splitlines()]
    ours, _, _ = generate_responses(model, processor, speech_rows, "speech_transcription")
    logged = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples]
    assert len(samples) == len(speech_rows) and sorted(logged) == sorted(ours)

    # multiple choice: the argmax of our log p(choice | image) per row, scored against the answers
    encoder = ExampleEncoder(processor)
    correct = []
    for row in mc_rows:
        parts = [split_prompt_response(encoder({"id": row["id"], "messages": row["messages"] + [{"role": "assistant", "content": c}]})) for c in captions]
        prompt = parts[0][0]
        scores = pair_log_likelihoods(model, [prompt], [r for _, r in parts], [(t, 0) for t in range(len(captions))], processor.tokenizer.pad_token_id)
        correct.append(int(np.argmax(scores.numpy())) == row["answer"])
    assert results["mm_mc"]["acc,none"] == pytest.approx(np.mean(correct))
