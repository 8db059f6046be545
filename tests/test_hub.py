"""Sharing on the Hub: model cards, and push -> from_pretrained through the test Hub (tests/hub_server.py).

Pushing and loading run in fresh Python processes pointed at the test Hub (HF_ENDPOINT is read at
import time and this process is offline): one process pushes every checkpoint of `PUSHES` (the trained
run's final/ through the `modeling-multimodal push` command), another loads every case of `LOADS` and
saves its logits, which must equal the logits of the local checkpoint. The loading process cannot import
modeling_multimodal: our model and processor come from the code the checkpoints carry, and for those
the processor's outputs on a real image + audio clip + video must equal the local processor's too.
"""

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from hub_server import HubServer
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_multimodal.testing_utils import tiny_config

from modeling_multimodal import MultimodalForConditionalGeneration, MultimodalProcessor
from modeling_multimodal.demo_data import make_demo_data
from modeling_multimodal.hub import (
    AUTO_MAP,
    COMPONENT_AUTO_MAPS,
    PROCESSOR_AUTO_MAP,
    checkpoint_files,
    render_model_card,
    save_custom_code,
    template_path,
    training_card_inputs,
    write_model_card_inputs,
)
from modeling_multimodal.testing_utils import WITHOUT_PACKAGE_PRELUDE, tiny_tokenizer
from modeling_multimodal.training.recipe import load_recipe
from modeling_multimodal.training.stages import apply_stage


INPUT_IDS = [[10, 11, 12, 13, 14, 15]]  # no media placeholder ids (4, 5, 6 in tiny_config)
PROMPT = "<image> <audio> <video> describe the image."  # with one real image, audio clip and video
TRAIN_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_test.yaml"
DEMO_SIZES = {
    "image": {"train": 8, "validation": 2, "test": 1},
    "video": {"train": 4, "validation": 1, "test": 1},
    "speech": {"train": 4, "validation": 2, "test": 1},
}
COMPONENTS = {"language model": "HuggingFaceTB/SmolLM2-135M", "vision encoder": "google/siglip-base-patch16-224"}
RECIPE = {"learning_rate": 1e-4, "loss": {"lambda_other": 0.1, "alpha_cross": 0.05}, "max_steps": 10}


# ---------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------
def card_metadata(card: ModelCard) -> dict:
    """The card's YAML as the Hub would read it back; ModelCardData raises on invalid metadata."""
    parsed = ModelCard(str(card)).data.to_dict()
    ModelCardData(**parsed, ignore_metadata_errors=False)
    return parsed


CARD_CASES = [
    # (name, render_model_card kwargs, expected metadata subset, text the body must contain)
    ("full model", dict(component_models=COMPONENTS, modalities=["image"], training_recipe=RECIPE,
                        eval_results=[{"dataset": "nlphuji/flickr30k", "split": "test", "metric": "bleu", "value": 0.31}],
                        datasets=["nlphuji/flickr30k"]),
     {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "license": "apache-2.0",
      "base_model": list(COMPONENTS.values()), "datasets": ["nlphuji/flickr30k"]},
     ["## Usage", "trust_remote_code=True", "lambda_other: 0.1", "| bleu | 0.31 |", "`<image>`"]),
    ("grouped metrics, task guessed", dict(component_models=COMPONENTS, modalities=["audio"],
                                           eval_results=[{"dataset": "openslr/librispeech_asr", "metrics": {"wer": 0.2, "cer": 0.1}}]),
     {"tags": ["modeling-multimodal", "multimodal", "audio"]},
     ["| automatic-speech-recognition | openslr/librispeech_asr |  | wer | 0.2 |", "get_retrieval_embeddings"]),
    ("adapter", dict(component_models=COMPONENTS, modalities=["image", "video"], adapter_base_model="org/base", license="mit"),
     {"library_name": "peft", "base_model": ["org/base"], "license": "mit"},
     ["PeftModel.from_pretrained(base", "LoRA adapter", "No evaluation results were recorded"]),
    ("bare", dict(component_models={}, modalities=[]),
     {"library_name": "transformers"}, ["No training recipe was recorded", "component models were not recorded"]),
]  # fmt: skip


@pytest.mark.parametrize("name, kwargs, metadata, body", CARD_CASES, ids=[case[0] for case in CARD_CASES])
def test_render_model_card(name, kwargs, metadata, body):
    card = render_model_card("org/demo", **kwargs)
    parsed = card_metadata(card)
    assert {key: parsed.get(key) for key in metadata} == metadata
    for text in body:
        assert text in card.text, f"{name}: {text!r} missing"
    if kwargs.get("eval_results"):
        results = ModelCard(str(card)).data.eval_results
        assert {(r.metric_type, r.metric_value) for r in results} >= {
            (m, v) for result in kwargs["eval_results"] for m, v in result.get("metrics", {result.get("metric"): result.get("value")}).items()
        }


BAD_CARD_CASES = [
    ("unknown modality", dict(component_models={}, modalities=["smell"]), "Unknown modalities"),
    ("local path as base model", dict(component_models={"language model": "/tmp/lm"}, modalities=[]), "Not Hub repo ids"),
    ("result without dataset", dict(component_models={}, modalities=[], eval_results=[{"metric": "wer", "value": 1.0}]), "eval_results[0] has no 'dataset'"),
    ("result without value", dict(component_models={}, modalities=[], eval_results=[{"dataset": "a/b", "metric": "wer"}]), "needs 'metric' and 'value'"),
    ("non-numeric value", dict(component_models={}, modalities=[], eval_results=[{"dataset": "a/b", "metric": "wer", "value": "low"}]), "non-numeric"),
    ("unknown metric, no task", dict(component_models={}, modalities=[], eval_results=[{"dataset": "a/b", "metric": "vibes", "value": 1}]), "no 'task' given"),
]  # fmt: skip


@pytest.mark.parametrize("name, kwargs, message", BAD_CARD_CASES, ids=[case[0] for case in BAD_CARD_CASES])
def test_render_model_card_rejects(name, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        render_model_card("org/demo", **kwargs)


def test_cards_are_rendered_from_the_repository_template():
    """The installed package data is the repository's template, and a rendered card is that template filled in."""
    repository_template = Path(__file__).resolve().parents[1] / "model_cards" / "multimodal_model_card.md"
    assert template_path().read_text(encoding="utf-8") == repository_template.read_text(encoding="utf-8")
    card = str(render_model_card("org/demo", {"text": "HuggingFaceTB/SmolLM2-135M-Instruct"}, ["image"]))
    headings = [line for line in repository_template.read_text(encoding="utf-8").splitlines() if line.startswith("## ")]
    assert headings and all(heading in card for heading in headings if "{" not in heading)
    assert "{{" not in card and "{%" not in card  # every template variable and block was rendered


CHECKPOINT_FILE_CASES = [
    # (name, files in the folder, expected pushed files or the ValueError message)
    ("trainer state is left out", ["config.json", "model.safetensors", "optimizer.pt", "trainer_state.json", "README.md", ".cache/x"],
     ["config.json", "model.safetensors"]),
    ("adapter", ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"],
     ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]),
    ("pickled weights", ["config.json", "pytorch_model.bin"], "pickled weights"),
    ("not a checkpoint", ["model.safetensors"], "neither config.json nor adapter_config.json"),
]  # fmt: skip


@pytest.mark.parametrize("name, files, expected", CHECKPOINT_FILE_CASES, ids=[case[0] for case in CHECKPOINT_FILE_CASES])
def test_checkpoint_files(tmp_path, name, files, expected):
    for file in files:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_bytes(b"x")
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            checkpoint_files(tmp_path)
    else:
        assert checkpoint_files(tmp_path) == expected


# ---------------------------------------------------------------------------------------------------
# Push and load through the test Hub
# ---------------------------------------------------------------------------------------------------
def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(INPUT_IDS)).logits


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """Tiny demo data: manifests for the training run, and one real image, speech clip and video for the processor."""
    root = tmp_path_factory.mktemp("demo_data")
    make_demo_data(root, seed=0, sizes=DEMO_SIZES)
    media = {
        "images": [str(root / "images" / "validation" / "000000.png")],
        "audio": [str(root / "audio" / "validation" / "000000.wav")],
        "videos": [str(root / "videos" / "validation" / "000000.mp4")],
    }
    return root, media


def media_outputs(folder, media, model=None) -> dict[str, torch.Tensor]:
    """What the package's processor and model, loaded from `folder`, make of PROMPT with the demo media."""
    processor = MultimodalProcessor.from_pretrained(folder)
    model = (model or MultimodalForConditionalGeneration.from_pretrained(folder)).eval()
    inputs = processor(text=PROMPT, **media, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    return {**{f"inputs/{key}": value for key, value in inputs.items()}, "logits": logits}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, demo_data):
    """Two tiny Llama checkpoints, a LoRA adapter on the first, our model + processor, and what each must
    reproduce (logits; for our model the processor's outputs on the demo media and the logits they give)."""
    _, media = demo_data
    root = tmp_path_factory.mktemp("checkpoints")
    references = {}
    for version, seed in (("v1", 0), ("v2", 1)):
        model = tiny_llama(seed)
        model.save_pretrained(root / version)
        references[version] = logits_of(model)
        results = [{"dataset": "nlphuji/flickr30k", "metric": "bleu", "value": 0.1 * seed + 0.2}]
        write_model_card_inputs(
            root / version, component_models=COMPONENTS, modalities=["image"], training_recipe=RECIPE, eval_results=results
        )
        (root / version / "README.md").write_text("---\nlibrary_name: transformers\n---\n# transformers' auto card\n")
        (root / version / "optimizer.pt").write_bytes(b"trainer state, never pushed")
    base = tiny_llama(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter = get_peft_model(base, lora).eval()
    adapter.save_pretrained(root / "adapter")
    adapter_config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "org/tiny-llama"  # the Hub id the adapter loads on
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    write_model_card_inputs(root / "adapter", component_models=COMPONENTS, modalities=["image"], adapter_base_model="org/tiny-llama")
    references["adapter"] = logits_of(adapter)
    references["merged"] = logits_of(adapter.merge_and_unload())
    assert not torch.allclose(references["adapter"], references["v1"]), "the adapter must change the logits"
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    # The convolutional vision stem: its module (vision_stem.py) must travel with the custom code too.
    multimodal = MultimodalForConditionalGeneration(tiny_config(tokenizer, vision_stem="conv")).eval()
    multimodal.save_pretrained(root / "multimodal")
    MultimodalProcessor.from_config_and_components(multimodal.config, tokenizer).save_pretrained(root / "multimodal")
    write_model_card_inputs(root / "multimodal", component_models=COMPONENTS, modalities=["image", "audio", "video"])
    references["multimodal"] = media_outputs(root / "multimodal", media)
    # A LoRA adapter on it whose projectors are trained too (modules_to_save), as the finetune stage saves it.
    stage = {"model": {"config": {}}, "data": {"train": [{"manifest": "x"}]}, "stage": "finetune"}
    peft_model = apply_stage(MultimodalForConditionalGeneration.from_pretrained(root / "multimodal"), load_recipe(values=stage))
    with torch.no_grad():  # stand-in for training: move every trainable weight
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(root / "multimodal-lora")
    adapter_config = json.loads((root / "multimodal-lora" / "adapter_config.json").read_text())
    assert any("multi_modal_projector" in module for module in adapter_config["modules_to_save"] or [])
    (root / "multimodal-lora" / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": "org/tiny-multimodal"}))
    references["multimodal lora"] = media_outputs(root / "multimodal", media, model=peft_model)
    assert not torch.equal(references["multimodal lora"]["logits"], references["multimodal"]["logits"])
    return root, references


PUSHES = [
    # (name, checkpoint, repo id, push_checkpoint keyword arguments); run in this order
    ("v1", "v1", "org/tiny-llama", {}),
    ("adapter", "adapter", "org/tiny-llama-lora", {}),
    ("merged", "adapter", "org/tiny-llama-merged", {"merge_adapter": True}),  # merges onto org/tiny-llama@main = v1
    ("v2", "v2", "org/tiny-llama", {"commit_message": "Second run"}),
    ("v1 on a branch", "v1", "org/tiny-llama", {"revision": "v1-branch"}),
    ("private", "v1", "org/tiny-llama-private", {"private": True}),
    ("multimodal", "multimodal", "org/tiny-multimodal", {}),
    ("multimodal lora", "multimodal-lora", "org/tiny-multimodal-lora", {}),
    ("multimodal sharded", "multimodal", "org/tiny-multimodal-sharded", {"max_shard_size": "100KB"}),
    ("trained", "TRAINED", "org/tiny-trained", {"cli": True}),  # `modeling-multimodal push <final_dir> <repo>`
]
PUSH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from huggingface_hub import HfApi
    from modeling_multimodal.cli import main
    from modeling_multimodal.hub import push_checkpoint
    from modeling_multimodal.training.recipe import load_recipe
    from modeling_multimodal.training.trainer import train
    args = json.loads(sys.argv[1])
    # A 4-step run of the tiny recipe whose final/ is pushed by the trainer itself (push_to_hub) ...
    result = train(load_recipe(args["train"]["recipe"], args["train"]["overrides"]))
    oids = {"trained (push_to_hub)": result["hub_commit"]}
    args["folders"]["TRAINED"] = result["final_dir"]  # ... and again by the CLI (PUSHES)
    for name, folder, repo, kwargs in args["pushes"]:
        folder = args["folders"].get(folder, f"{args['root']}/{folder}")
        if kwargs.pop("cli", False):
            assert main(["push", folder, repo]) == 0
            oids[name] = HfApi().model_info(repo).sha
        else:
            oids[name] = push_checkpoint(folder, repo, **kwargs).oid
    print(json.dumps({"oids": oids, "final_dir": result["final_dir"], "scores": result["scores"]}))
    """
)

LOADS = [
    # (name, repo id, revision: a PUSHES name (its commit sha), a branch, or None for main, reference logits)
    ("main is the second push", "org/tiny-llama", None, "v2"),
    ("older revision by sha", "org/tiny-llama", "v1", "v1"),
    ("branch", "org/tiny-llama", "v1-branch", "v1"),
    ("adapter on its base", "org/tiny-llama-lora", None, "adapter"),
    ("merged weights", "org/tiny-llama-merged", None, "merged"),
    ("private repo with token", "org/tiny-llama-private", None, "v1"),
    ("multimodal from its own code", "org/tiny-multimodal", None, "multimodal"),
    ("multimodal sharded", "org/tiny-multimodal-sharded", None, "multimodal"),
    ("multimodal adapter with projectors", "org/tiny-multimodal-lora", None, "multimodal lora"),
    ("trained run pushed by the CLI", "org/tiny-trained", None, "trained"),
    ("trained run pushed by push_to_hub", "org/tiny-trained-auto", None, "trained"),
]
OUR_MODELS = {"multimodal", "trained", "multimodal lora"}  # references that come with a processor and media outputs
LOAD_SCRIPT = WITHOUT_PACKAGE_PRELUDE + textwrap.dedent(
    """
    import torch
    from huggingface_hub import HfApi, hf_hub_download, metadata_load
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
    torch.set_num_threads(2)
    args = json.loads(sys.argv[1])
    logits, report = {}, {"files": {}, "cards": {}, "classes": {}}
    for name, repo, revision, ours in args["loads"]:
        if repo.endswith("-lora") and not ours:
            base = AutoModelForCausalLM.from_pretrained("org/tiny-llama", revision=args["v1_sha"])
            model = PeftModel.from_pretrained(base, repo, revision=revision)
        elif ours:  # our model and processor, from the code the repo (or, for an adapter, its base) carries
            code_repo, code_revision = ("org/tiny-multimodal", None) if repo.endswith("-lora") else (repo, revision)
            model = AutoModelForImageTextToText.from_pretrained(code_repo, revision=code_revision, trust_remote_code=True)
            if repo.endswith("-lora"):
                model = PeftModel.from_pretrained(model, repo, revision=revision)
            processor = AutoProcessor.from_pretrained(code_repo, revision=code_revision, trust_remote_code=True)
            image_processor = AutoImageProcessor.from_pretrained(code_repo, revision=code_revision, trust_remote_code=True)
            inputs = processor(text=args["prompt"], **args["media"], return_tensors="pt")
            logits |= {f"{name}/inputs/{key}": value.contiguous() for key, value in inputs.items()}
            with torch.no_grad():
                logits[f"{name}/logits"] = model.eval()(**inputs).logits.contiguous()
            components = (model, processor, processor.image_processor, processor.video_processor, image_processor)
            report["classes"][name] = [f"{type(c).__module__}.{type(c).__name__}" for c in components]
            report["files"][name] = sorted(HfApi().list_repo_files(repo, revision=revision))
            readme = hf_hub_download(repo, "README.md", revision=revision)
            report["cards"][name] = {"metadata": metadata_load(readme), "text": open(readme).read()}
            continue
        else:
            model = AutoModelForCausalLM.from_pretrained(repo, revision=revision)
        with torch.no_grad():
            logits[name] = model.eval()(torch.tensor(args["input_ids"])).logits.contiguous()
        report["files"][name] = sorted(HfApi().list_repo_files(repo, revision=revision))
        readme = hf_hub_download(repo, "README.md", revision=revision)
        report["cards"][name] = {"metadata": metadata_load(readme), "text": open(readme).read()}
    report["private"] = HfApi().model_info("org/tiny-llama-private").private
    report["package_hidden"] = package_hidden
    report["multimodal_config"] = json.load(open(hf_hub_download("org/tiny-multimodal", "config.json")))
    report["processor_config"] = json.load(open(hf_hub_download("org/tiny-multimodal", "processor_config.json")))
    save_file(logits, args["out"])
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def push_report(hub, checkpoints, demo_data, tmp_path_factory):
    root, _ = checkpoints
    pushes = [[name, folder, repo, kwargs] for name, folder, repo, kwargs in PUSHES]
    overrides = [
        f"data.root={demo_data[0]}", f"output_dir={tmp_path_factory.mktemp('run')}", "report=false",
        "optim.max_steps=4", "data.eval_max_samples=2", "push_to_hub=org/tiny-trained-auto",
    ]  # fmt: skip
    args = {"root": str(root), "pushes": pushes, "folders": {}, "train": {"recipe": str(TRAIN_RECIPE), "overrides": overrides}}
    return hub.run_client(PUSH_SCRIPT, args, str(tmp_path_factory.mktemp("hf_home_push")), timeout=240)


@pytest.fixture(scope="module")
def pushed(push_report):
    """Push name -> commit sha."""
    return push_report["oids"]


@pytest.fixture(scope="module")
def trained(push_report):
    """The training run's final/ folder (pushed twice) and its final eval scores."""
    return Path(push_report["final_dir"]), push_report["scores"]


@pytest.fixture(scope="module")
def references(checkpoints, trained, demo_data):
    _, references = checkpoints
    return {**references, "trained": media_outputs(trained[0], demo_data[1])}


@pytest.fixture(scope="module")
def loaded(hub, pushed, demo_data, tmp_path_factory):
    _, media = demo_data
    out = tmp_path_factory.mktemp("loaded") / "logits.safetensors"
    loads = [[name, repo, pushed.get(revision, revision), reference in OUR_MODELS] for name, repo, revision, reference in LOADS]
    args = {"loads": loads, "v1_sha": pushed["v1"], "input_ids": INPUT_IDS, "out": str(out), "prompt": PROMPT, "media": media}
    cwd = tmp_path_factory.mktemp("elsewhere")  # not the repository root, where the package is importable
    report = hub.run_client(LOAD_SCRIPT, args, str(tmp_path_factory.mktemp("hf_home_load")), cwd=str(cwd))
    return load_file(out), report


@pytest.mark.parametrize("name, repo, revision, reference", LOADS, ids=[case[0] for case in LOADS])
def test_from_pretrained_in_a_fresh_process_reproduces_logits(references, loaded, name, repo, revision, reference):
    logits, _ = loaded
    if reference in OUR_MODELS:  # processor outputs on image + audio + video, then the logits they give
        expected = references[reference]
        assert {f"{name}/{key}" for key in expected} == {key for key in logits if key.startswith(f"{name}/")}
        assert expected["inputs/pixel_values_videos"].shape[0] == 1 and expected["inputs/input_features"].shape[0] == 1
        for key, value in expected.items():
            torch.testing.assert_close(logits[f"{name}/{key}"], value, rtol=0, atol=0, msg=f"{name}: {key}")
        return
    atol = 1e-5 if reference == "merged" else 1e-6  # merging reorders the LoRA arithmetic
    torch.testing.assert_close(logits[name], references[reference], rtol=0, atol=atol)


def test_every_push_is_a_new_revision(pushed):
    assert len(set(pushed.values())) == len(PUSHES) + 1  # + the trainer's own push
    assert all(len(oid) == 40 for oid in pushed.values())


@pytest.mark.parametrize("name", [case[0] for case in LOADS])
def test_our_card_lands_and_parses(loaded, name):
    _, report = loaded
    card, files = report["cards"][name], report["files"][name]
    assert "modeling-multimodal model card" in card["text"] and "transformers' auto card" not in card["text"]
    ModelCardData(**card["metadata"], ignore_metadata_errors=False)
    assert "optimizer.pt" not in files and "README.md" in files
    if name in ("adapter on its base", "multimodal adapter with projectors"):
        base = "org/tiny-llama" if name == "adapter on its base" else "org/tiny-multimodal"
        assert card["metadata"]["library_name"] == "peft" and card["metadata"]["base_model"] == [base]
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files) and "model.safetensors" not in files
    elif name == "multimodal sharded":
        shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
        assert "model.safetensors.index.json" in files and "model.safetensors" not in files and len(shards) > 1
    else:
        assert card["metadata"]["library_name"] == "transformers" and "model.safetensors" in files
        assert not any(f.startswith("adapter_") for f in files)


def test_cards_carry_each_runs_results(loaded):
    _, report = loaded

    def bleu(name):
        (result,) = report["cards"][name]["metadata"]["model-index"][0]["results"]
        return result["metrics"][0]["value"]

    assert bleu("older revision by sha") == pytest.approx(0.2)
    assert bleu("main is the second push") == pytest.approx(0.3)
    assert "lora-merged" in report["cards"]["merged weights"]["metadata"]["tags"]


def test_private_push(loaded):
    _, report = loaded
    assert report["private"] is True


def test_card_inputs_file_round_trips(checkpoints):
    root, _ = checkpoints
    saved = json.loads((root / "v1" / "model_card_inputs.json").read_text())
    assert saved["component_models"] == COMPONENTS and saved["training_recipe"] == RECIPE


CODE_FILES = {
    "configuration_multimodal.py", "media_tokens.py", "modeling_multimodal.py", "encoders.py", "losses.py", "projectors.py", "vision_stem.py",
    "constants.py", "processing_multimodal.py", "image_processing_multimodal.py", "video_processing_multimodal.py", "audio_loading.py",
    "media_files.py", "media_batch.py", "chat_template.py", "truncation.py", "composition.py", "tokenization.py", "input_checks.py", "retrieval.py", "media_registry.py",
    "tiling.py", "image_tiling.py", "video_frames.py", "part_weights.py",
}  # fmt: skip


@pytest.mark.parametrize("name", [case[0] for case in LOADS if case[3] in OUR_MODELS - {"multimodal lora"}])
def test_custom_code_travels_with_the_checkpoint(loaded, name):
    _, report = loaded
    assert report["package_hidden"], "the loading process must not see modeling_multimodal"
    classes = report["classes"][name]
    assert all(c.startswith("transformers_modules.") for c in classes), classes
    assert [c.rsplit(".", 1)[1] for c in classes] == [
        "MultimodalForConditionalGeneration", "MultimodalProcessor", "MultimodalImageProcessor",
        "MultimodalVideoProcessor", "MultimodalImageProcessor",
    ]  # fmt: skip
    assert CODE_FILES <= set(report["files"][name])
    assert "pip install torch transformers numpy pillow av soundfile" in report["cards"][name]["text"]


def test_auto_maps_in_the_pushed_configs(loaded):
    _, report = loaded
    assert report["multimodal_config"]["auto_map"] == AUTO_MAP
    processor_config = report["processor_config"]
    assert processor_config["auto_map"] == PROCESSOR_AUTO_MAP
    for component, auto_map in COMPONENT_AUTO_MAPS.items():
        assert processor_config[component]["auto_map"] == auto_map


@pytest.mark.parametrize("name", ["trained run pushed by the CLI", "trained run pushed by push_to_hub"])
def test_trained_run_card_carries_recipe_and_final_eval(loaded, trained, name):
    """The trainer writes model_card_inputs.json into final/; a push (CLI or push_to_hub) turns it into the card."""
    _, report = loaded
    _, scores = trained
    card = report["cards"][name]
    (index,) = card["metadata"]["model-index"]
    pushed = {(m["type"], m["value"]) for result in index["results"] for m in result["metrics"]}
    assert scores and pushed == {(key.split("/", 1)[1], round(value, 4)) for key, value in scores.items()}
    datasets = {result["dataset"]["type"] for result in index["results"]}
    assert datasets == {"image_validation", "speech_validation"}
    assert "stage: full" in card["text"] and "| speech_transcription" not in card["text"]
    assert "| automatic-speech-recognition | speech_validation |" in card["text"]
    assert "stage-full" in card["metadata"]["tags"] and {"vision", "audio", "video"} <= set(card["metadata"]["tags"])


def test_trainer_final_dir_is_self_contained(trained):
    final_dir, _ = trained
    assert CODE_FILES <= {p.name for p in final_dir.iterdir()}
    assert json.loads((final_dir / "config.json").read_text())["auto_map"] == AUTO_MAP
    inputs = json.loads((final_dir / "model_card_inputs.json").read_text())
    assert inputs["modalities"] == ["image", "audio", "video"] and inputs["training_recipe"]["optim"]["max_steps"] == 4


def test_saved_code_does_not_shadow_the_installed_package(checkpoints, demo_data, tmp_path):
    """With the package installed, a folder that carries code and auto_map still loads the package's classes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    root, references = checkpoints
    folder = tmp_path / "multimodal"
    folder.mkdir()
    for path in (root / "multimodal").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    written = save_custom_code(folder)
    assert CODE_FILES | {"config.json", "processor_config.json"} == set(written)
    assert save_custom_code(folder) == written  # idempotent
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(processor) is MultimodalProcessor and type(model) is MultimodalForConditionalGeneration
    outputs = media_outputs(folder, demo_data[1])
    assert outputs.keys() == references["multimodal"].keys()
    torch.testing.assert_close(outputs["logits"], references["multimodal"]["logits"], rtol=0, atol=0)


TRAINING_CARD_CASES = [
    # (name, recipe model/init_from, expected component_models)
    ("from scratch", {"model": {"config": {}}}, {}),
    ("Hub components", {"model": {"components": {"text": "HuggingFaceTB/SmolLM2-135M", "vision": "google/siglip-base-patch16-224"}}},
     {"language model": "HuggingFaceTB/SmolLM2-135M", "vision encoder": "google/siglip-base-patch16-224"}),
    ("local components are left out", {"model": {"components": {"text": "/models/lm", "audio": "openai/whisper-tiny"}}},
     {"audio encoder": "openai/whisper-tiny"}),
    ("stage chained from a Hub checkpoint", {"model": {}, "init_from": "org/aligned"}, {"initialised from": "org/aligned"}),
]  # fmt: skip


@pytest.mark.parametrize("name, recipe, components", TRAINING_CARD_CASES, ids=[c[0] for c in TRAINING_CARD_CASES])
def test_training_card_inputs(name, recipe, components, tmp_path):
    recipe = {**recipe, "stage": "align", "data": {"eval": [{"manifest": "sub/speech val.jsonl", "task": "speech_transcription"}]}}
    config = tiny_config(audio=False).to_dict()
    scores = {"speech_transcription/wer": 0.25, "speech_transcription/text_to_media_recall@1": 0.5, "other/bleu": 1.0}
    inputs = training_card_inputs(recipe, config, scores)
    assert inputs["component_models"] == components and inputs["modalities"] == ["image", "video"]
    assert [(r["dataset"], r["task"], r["metric"], r["value"]) for r in inputs["eval_results"]] == [
        ("speech-val", "automatic-speech-recognition", "wer", 0.25),
        ("speech-val", "feature-extraction", "text_to_media_recall@1", 0.5),
    ]
    card_metadata(render_model_card("org/run", **inputs))
    write_model_card_inputs(tmp_path, **inputs)  # renders once more, as the trainer does
