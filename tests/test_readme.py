"""The README's code runs as written, on tiny local parts where it names real ones (as litgpt's test_readme.py).

Its Python blocks run in order in one namespace, in a fresh folder, with the Hub ids it names replaced by tiny
folders laid out like those checkpoints and the demo's sizes and step counts made small; its shell commands
must name real `modeling-multimodal` subcommands and files. So the README cannot drift from the code.
"""

import re
import shlex
from pathlib import Path

import pytest
import torch
from transformers import (
    BitImageProcessorPil, Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM, WhisperConfig,
    WhisperFeatureExtractor, WhisperForConditionalGeneration,
)  # fmt: skip

from modeling_multimodal.cli import build_parser
from modeling_multimodal.demo_data import grammar
from modeling_multimodal.tokenization import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMALL_DATA = {"image": {"train": 8, "validation": 2, "test": 2}, "video": {"train": 4, "validation": 2, "test": 1},
              "speech": {"train": 4, "validation": 2, "test": 1}}  # fmt: skip


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_is_a_users_readme():
    assert len(README.encode()) <= 10_500, "the README is for users: results and history belong in docs/"
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", README):
        assert (REPO / link).is_file(), f"the README links to {link}, which does not exist"


@pytest.fixture
def tiny_parts(tmp_path):
    """An LM with a ChatML template, a DINOv2 tower with its image processor and a Whisper model with its feature
    extractor, saved as the Hub checkpoints the README names are."""
    words = [*grammar.COLOURS, *grammar.SHAPES, *grammar.SIZES, *grammar.ROWS, *grammar.COLUMNS, *grammar.DIRECTIONS]
    corpus = [" ".join(words), "a the in is moving describe image what said video audio user assistant system"]
    tokenizer = build_tokenizer(corpus, kind="word", media_tokens=False)
    tokenizer.chat_template = CHATML
    parts = {name: tmp_path / "hub" / name for name in ("lm", "dinov2", "whisper")}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2)).save_pretrained(parts["lm"])  # fmt: skip
    tokenizer.save_pretrained(parts["lm"])
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                             image_size=518, patch_size=14)).save_pretrained(parts["dinov2"])  # fmt: skip
    BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}).save_pretrained(parts["dinov2"])
    WhisperForConditionalGeneration(WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=60, pad_token_id=1, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )).save_pretrained(parts["whisper"])  # fmt: skip
    WhisperFeatureExtractor(feature_size=80).save_pretrained(parts["whisper"])
    return parts


def test_python_blocks_run(tiny_parts, tmp_path, monkeypatch, capsys):
    replacements = {
        '"HuggingFaceTB/SmolLM2-135M-Instruct"': repr(str(tiny_parts["lm"])),
        "=HuggingFaceTB/SmolLM2-135M-Instruct": f"={tiny_parts['lm']}",
        '"facebook/dinov2-small"': repr(str(tiny_parts["dinov2"])),
        "=facebook/dinov2-small": f"={tiny_parts['dinov2']}",
        '"openai/whisper-tiny.en"': repr(str(tiny_parts["whisper"])),
        "=openai/whisper-tiny.en": f"={tiny_parts['whisper']}",
        'make_demo_data("data")': f'make_demo_data("data", sizes={SMALL_DATA!r})',
        '"recipes/demo_pretrained.yaml"': repr(str(REPO / "recipes" / "demo_pretrained.yaml")),
        '"output_dir=runs/align",': '"output_dir=runs/align", "optim.max_steps=2", "data.eval=[]", "mixed_precision=no",',
        "max_new_tokens=32": "max_new_tokens=4",
    }
    blocks = code_blocks("python")
    assert blocks and "from_pretrained_components" in blocks[0] and "Trainer(recipe).train()" in blocks[0]
    for old in replacements:
        assert any(old in block for block in blocks), f"{old} is no longer in the README: update this test"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        for old, new in replacements.items():
            block = block.replace(old, new)
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "True"  # the LM's own chat template is kept
    assert namespace["scores"].shape == (2, 1) and namespace["image"].shape[0] == 1
    assert Path(namespace["final_dir"]).is_dir() and namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]


def test_shell_commands_name_real_subcommands_and_files():
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    commands = [line.split("#")[0].strip() for block in code_blocks("bash") for line in block.splitlines()]
    commands = [shlex.split(part) for command in commands for part in command.split("&&") if part.strip()]
    used = {}
    for words in commands:
        if words[0].endswith("modeling-multimodal"):
            assert words[1] in subcommands, f"the README runs `modeling-multimodal {words[1]}`, which does not exist"
            used[words[1]] = words
        for word in words:
            if word.startswith(("recipes/", "scripts/")) or word.endswith((".yaml", ".sh")):
                assert (REPO / word).is_file(), f"the README names {word}, which does not exist"
    assert {"train", "evaluate", "convert", "push", "demo"} <= set(used)
    build_parser().parse_args(used["train"][1:])  # the options the README shows are the command's own
    build_parser().parse_args(used["evaluate"][1:])
