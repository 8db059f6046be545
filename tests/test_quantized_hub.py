"""A quantized checkpoint pushed to the Hub loads back by repo id (`load_quantized(repo_id)`, the CLI), and
`from_pretrained` on a quantized folder or repo says to use `load_quantized` instead of "no model.safetensors"."""

import pytest
from hub_server import HubServer

from modeling_multimodal import MultimodalForConditionalGeneration
from modeling_multimodal.compression import quantize_checkpoint

CLIENT = """
import json, sys
import torch
from modeling_multimodal.cli import main
from modeling_multimodal.compression import load_quantized
from modeling_multimodal import MultimodalForConditionalGeneration
args = json.loads(sys.argv[1])
assert main(["push", args["folder"], "org/tiny-quantized"]) == 0
local, _ = load_quantized(args["folder"])
remote, processor = load_quantized("org/tiny-quantized")
ids = processor(text="describe the image", return_tensors="pt")["input_ids"]
with torch.no_grad():
    same = torch.equal(local(ids).logits, remote(ids).logits)
try:
    MultimodalForConditionalGeneration.from_pretrained("org/tiny-quantized")
    message = None
except ValueError as err:
    message = str(err)
print(json.dumps({"same": same, "message": message, "processor": type(processor).__name__}))
"""


def test_a_pushed_quantized_checkpoint_loads_back_by_repo_id(checkpoint, tmp_path):
    folder = quantize_checkpoint(checkpoint, tmp_path / "quantized", "dynamic-int8")
    with pytest.raises(ValueError, match=r"is a quantized checkpoint .*load_quantized"):
        MultimodalForConditionalGeneration.from_pretrained(folder)
    with HubServer() as hub:
        report = hub.run_client(CLIENT, {"folder": str(folder)}, str(tmp_path / "hf_home"), timeout=240)
    assert report["same"] and report["processor"] == "MultimodalProcessor"
    assert "is a quantized checkpoint" in report["message"] and "load_quantized('org/tiny-quantized')" in report["message"]
