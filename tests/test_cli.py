"""The `modeling-multimodal` command: one-line errors with exit status 2 for every user error, tracebacks for
bugs, `make-demo-data --sizes/--image-size`, and `evaluate` over several manifests with every prediction written.

Commands run in-process (`cli.main([...])`, stderr captured) except the pushes, which need huggingface_hub
imported with HF_ENDPOINT pointing at a local socket (the endpoint is read at import time).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from modeling_multimodal import cli

ERROR_PREFIX = "modeling-multimodal: error: "


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Demo data made through the command: 3 test images, 2 test videos, nothing else."""
    out = tmp_path_factory.mktemp("data")
    sizes = "image.train=0,image.validation=0,image.test=3,video.train=0,video.validation=0,video.test=2"
    assert cli.main(["make-demo-data", str(out), "--sizes", sizes, "--sizes", "speech.train=0,speech.validation=0", "--sizes", "speech.test=0", "--image-size", "32", "--overwrite"]) == 0
    return out


def run(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _corrupt_checkpoint(checkpoint, tmp):
    import shutil

    folder = tmp / "corrupt"
    shutil.copytree(checkpoint, folder)
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 8)
    return folder


def _fifo(tmp):
    path = tmp / "recipe.yaml"
    os.mkfifo(path)  # nobody writes: reading it would block forever
    return path


def _write(tmp, name, text):
    path = tmp / name
    path.write_text(text)
    return path


USER_ERRORS = [  # (name, argv built from (checkpoint, data, tmp), pattern the one line must match)
    ("checkpoint_folder_missing", lambda c, d, t: ["generate", t / "no-such-run", "--prompt", "hi"], r"checkpoint folder '.*no-such-run' does not exist"),
    ("checkpoint_is_a_file", lambda c, d, t: ["generate", c / "config.json", "--prompt", "hi"], r"checkpoint '.*config.json' is a file; pass the folder"),
    ("corrupt_safetensors", lambda c, d, t: ["generate", _corrupt_checkpoint(c, t), "--prompt", "hi"], r"corrupt/model.safetensors cannot be read .*corrupt or truncated .safetensors"),
    ("hub_id_while_offline", lambda c, d, t: ["generate", "someone/missing-model", "--prompt", "hi"], r"cannot load checkpoint 'someone/missing-model': .*(connect|offline)"),
    ("missing_media_file", lambda c, d, t: ["generate", c, "--prompt", "hi", "--image", t / "nope.png"], r"image 0 \(file '.*nope.png'\).* does not exist"),
    ("malformed_manifest_line", lambda c, d, t: ["evaluate", c, "--root", d, "--manifest", _write(d, "bad.jsonl", '{"image": \n').name + ":image_caption"], r"Manifest '.*bad.jsonl', line 1: not valid JSON"),
    ("empty_manifest", lambda c, d, t: ["evaluate", c, "--root", d, "--manifest", "image_validation.jsonl:image_caption"], r"Manifest '.*image_validation.jsonl' is empty"),
    ("manifest_without_task", lambda c, d, t: ["evaluate", c, "--root", d, "--manifest", "image_test.jsonl"], r"--manifest 'image_test.jsonl' has no task: write MANIFEST:TASK"),
    ("missing_manifest", lambda c, d, t: ["evaluate", c, "--root", d, "--manifest", "nope.jsonl:image_caption"], r"Manifest '.*nope.jsonl' does not exist"),
    ("out_under_a_file", lambda c, d, t: ["evaluate", c, "--root", d, "--manifest", "image_test.jsonl:image_caption", "--out", c / "config.json" / "p.jsonl"], r"config.json: File exists"),
    ("missing_recipe", lambda c, d, t: ["train", "--recipe", t / "nope.yaml"], r"Recipe .*nope.yaml does not exist"),
    ("recipe_is_a_directory", lambda c, d, t: ["train", "--recipe", t], r"recipe .* is not a regular file"),
    ("recipe_is_a_fifo", lambda c, d, t: ["train", "--recipe", _fifo(t)], r"recipe .*recipe.yaml is not a regular file"),
    ("recipe_yaml_syntax", lambda c, d, t: ["train", "--recipe", _write(t, "broken.yaml", "optim:\n  lr: [1, 2\nstage: align\n")], r"[Rr]ecipe .*broken.yaml: not valid YAML .*line \d+"),
    ("bad_override", lambda c, d, t: ["train", "--recipe", "recipes/tiny_test.yaml", "nonsense"], r"nonsense"),
    ("demo_data_over_other_files", lambda c, d, t: ["make-demo-data", _write(t, "x.txt", "mine").parent, "--sizes", "image.test=1"], r"is not empty and holds no demo data"),
    ("unknown_demo_data_task", lambda c, d, t: ["make-demo-data", t / "new", "--sizes", "audio.train=3"], r"Unknown task 'audio' in sizes"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name, make_argv, pattern", USER_ERRORS, ids=[case[0] for case in USER_ERRORS])
def test_user_errors_are_one_line_and_exit_2(checkpoint, data, tmp_path, capsys, name, make_argv, pattern):
    code, err = run(make_argv(checkpoint, data, tmp_path), capsys)
    lines = [line for line in err.splitlines() if line.startswith("modeling-multimodal")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    assert "Traceback" not in err
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_permission_denied_is_a_user_error(tmp_path, capsys, monkeypatch):
    """(Simulated: the suite may run as root, which reads any file.)"""
    import modeling_multimodal.training.recipe as recipe

    def denied(path, overrides=()):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(recipe, "load_recipe", denied)
    code, err = run(["train", "--recipe", tmp_path / "r.yaml"], capsys)
    assert code == 2 and err.strip() == f"{ERROR_PREFIX}{tmp_path / 'r.yaml'}: Permission denied"


def test_bugs_keep_their_traceback(monkeypatch):
    """An exception that is no user error (here a TypeError from inside a command) is not swallowed."""
    import modeling_multimodal.training.recipe as recipe

    def bug(path, overrides=()):
        return None + 1

    monkeypatch.setattr(recipe, "load_recipe", bug)
    with pytest.raises(TypeError):
        cli.main(["train", "--recipe", "recipes/tiny_test.yaml"])


USAGE_ERRORS = [  # (argv, what argparse's error says)
    (["make-demo-data", "out", "--sizes", "image.train"], "expected TASK.SPLIT=N"),
    (["make-demo-data", "out", "--sizes", "image=3"], "expected TASK.SPLIT=N"),
    (["make-demo-data", "out", "--sizes", "image.train=-1"], "expected TASK.SPLIT=N"),
    (["make-demo-data", "out", "--sizes", "image.train=x"], "expected TASK.SPLIT=N"),
    (["evaluate", "ckpt", "--root", ".", "--manifest", "m.jsonl", "--max-samples", "0"], "expected an integer >= 1, got '0'"),
    (["evaluate", "ckpt", "--root", ".", "--manifest", "m.jsonl", "--rerank-top-k", "-2"], "expected an integer >= 0, got '-2'"),
    (["generate", "ckpt", "--prompt", "hi", "--max-new-tokens", "many"], "expected an integer >= 1, got 'many'"),
    (["evaluate", "ckpt", "--root", "."], "the following arguments are required: --manifest"),
]


@pytest.mark.parametrize("argv, message", USAGE_ERRORS, ids=[" ".join(argv[:1] + argv[-2:]) for argv, _ in USAGE_ERRORS])
def test_malformed_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "modeling-multimodal " in err and "Traceback" not in err


def test_make_demo_data_sizes_and_image_size(data):
    import PIL.Image

    counts = {name: sum(1 for _ in open(data / f"{name}.jsonl")) for name in ("image_test", "video_test", "image_train", "speech_test")}
    assert counts == {"image_test": 3, "video_test": 2, "image_train": 0, "speech_test": 0}
    meta = json.loads((data / "meta.json").read_text())
    assert meta["config"]["image_size"] == 32 and meta["counts"]["image"] == {"train": 0, "validation": 0, "test": 3}
    first = json.loads((data / "image_test.jsonl").read_text().splitlines()[0])
    assert PIL.Image.open(data / first["image"]).size == (32, 32)


def test_evaluate_several_manifests_one_load_every_prediction(checkpoint, data, tmp_path, capsys, monkeypatch):
    loads = []
    load = cli._load_checkpoint
    monkeypatch.setattr(cli, "_load_checkpoint", lambda path, command: loads.append(path) or load(path, command))
    out = tmp_path / "predictions.jsonl"
    argv = ["evaluate", checkpoint, "--root", data, "--manifest", "image_test.jsonl:image_caption",
            "--manifest", "video_test.jsonl", "--task", "video_caption", "--no-retrieval", "--out", out]
    assert cli.main([str(a) for a in argv]) == 0
    assert len(loads) == 1
    summary = json.loads(capsys.readouterr().out)
    assert [(r["manifest"], r["task"], r["rows"]) for r in summary["results"]] == [
        ("image_test.jsonl", "image_caption", 3), ("video_test.jsonl", "video_caption", 2)]
    assert all(set(r["scores"]) == {"exact_match", "bleu"} for r in summary["results"])  # no retrieval keys
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    references = {json.loads(row)["id"]: json.loads(row)["caption"] for name in ("image_test", "video_test")
                  for row in (data / f"{name}.jsonl").read_text().splitlines()}
    assert [line["id"] for line in lines] == list(references)  # every row, in order
    assert all(line["reference"] == references[line["id"]] and isinstance(line["prediction"], str) for line in lines)
    assert {line["task"] for line in lines} == {"image_caption", "video_caption"}


def test_evaluate_json_out_keeps_retrieval_by_default(checkpoint, data, tmp_path, capsys):
    """Retrieval scores come by default where the model has a retrieval head; a model without one (α = 0) still
    gets its caption scores."""
    from modeling_multimodal import MultimodalForConditionalGeneration, MultimodalProcessor

    with_head = tmp_path / "with_head"
    model = MultimodalForConditionalGeneration.from_pretrained(checkpoint)
    model.config.retrieval_head = True
    MultimodalForConditionalGeneration(model.config).save_pretrained(with_head)
    MultimodalProcessor.from_pretrained(checkpoint).save_pretrained(with_head)
    for folder, retrieval in ((with_head, True), (checkpoint, False)):
        out = tmp_path / f"result_{retrieval}.json"
        assert cli.main([str(a) for a in ["evaluate", folder, "--root", data, "--manifest", "image_test.jsonl:image_caption", "--out", out]]) == 0
        (only,) = json.loads(out.read_text())["results"]
        assert len(only["predictions"]) == 3 and "exact_match" in only["scores"]
        assert ("text_to_media_recall@1" in only["scores"]) is retrieval


# --- push: timeouts and unreachable hubs (subprocesses: HF_ENDPOINT is read at import) --------------------
def _push(folder, endpoint, tmp, *extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_TOKEN="hf_test", HF_HUB_DISABLE_XET="1",
               HF_HOME=str(tmp / "hf_home"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", OMP_NUM_THREADS="1")
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(key, None)
    command = [sys.executable, "-m", "modeling_multimodal.cli", "push", str(folder), "org/model", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_push_to_a_hub_that_never_answers_times_out(checkpoint, tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = _push(checkpoint, endpoint, tmp_path, "--timeout", "2")
    assert result.returncode == 2, result.stderr
    assert f"{ERROR_PREFIX}the Hub at {endpoint} did not answer within 2 s (POST {endpoint}/api/repos/create)" in result.stderr
    assert "Traceback" not in result.stderr


def test_push_to_an_unreachable_hub_is_a_connection_error(checkpoint, tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: connections are refused
        result = _push(checkpoint, endpoint, tmp_path, "--timeout", "5")
    assert result.returncode == 2, result.stderr
    assert f"{ERROR_PREFIX}cannot reach the Hub at {endpoint}" in result.stderr and "Traceback" not in result.stderr
