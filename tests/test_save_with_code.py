"""A plain `model.save_pretrained(dir)` + `processor.save_pretrained(dir)` carry the code: a process without the
package loads both with `trust_remote_code=True` and gets the same logits (and can save and reload them again)."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file, save_file
from test_modeling import TOKENIZER, build_model
from media_builders import random_image, tone

from modeling_multimodal import MultimodalProcessor
from modeling_multimodal.testing_utils import WITHOUT_PACKAGE_PRELUDE

REMOTE_SCRIPT = WITHOUT_PACKAGE_PRELUDE + textwrap.dedent(
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText, AutoProcessor
    torch.set_num_threads(1)
    folder, again, inputs_file, out = sys.argv[1:5]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(text="<image> <audio> describe the image", images=load_file(inputs_file)["image"].numpy(),
                       audio=load_file(inputs_file)["audio"].numpy(), sampling_rate=16000)
    model.save_pretrained(again)  # remote code saves itself as transformers copies any remote-code module
    reloaded = AutoModelForImageTextToText.from_pretrained(again, trust_remote_code=True).eval()
    with torch.no_grad():
        save_file({"logits": model(**inputs).logits, "reloaded": reloaded(**inputs).logits,
                   "input_ids": inputs["input_ids"]}, out)
    print(json.dumps({"hidden": package_hidden, "model": type(model).__module__, "processor": type(processor).__module__}))
    """
)


def test_plain_save_pretrained_loads_without_the_package(tmp_path):
    model = build_model()
    processor = MultimodalProcessor.from_config_and_components(model.config, TOKENIZER)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_multimodal.MultimodalForConditionalGeneration"
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"]["AutoProcessor"] == (
        "processing_multimodal.MultimodalProcessor"
    )
    assert {"modeling_multimodal.py", "configuration_multimodal.py", "processing_multimodal.py"} <= set(os.listdir(folder))

    image, audio = random_image(32, 32), tone(0.5)
    save_file({"image": torch.from_numpy(image), "audio": torch.from_numpy(audio)}, tmp_path / "inputs.safetensors")
    inputs = processor(text="<image> <audio> describe the image", images=image, audio=audio, sampling_rate=16000)
    with torch.no_grad():
        expected = model(**inputs).logits
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "again"), str(tmp_path / "inputs.safetensors"), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["hidden"] and report["model"].startswith("transformers_modules"), report
    assert report["processor"].startswith("transformers_modules"), report
    remote = load_file(out)
    torch.testing.assert_close(remote["input_ids"], inputs["input_ids"], rtol=0, atol=0)
    # Same weights and code; the two processes differ in thread count only (float summation order).
    torch.testing.assert_close(remote["logits"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(remote["reloaded"], remote["logits"], rtol=0, atol=0)
