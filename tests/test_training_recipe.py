"""Recipes: every value checked naming its key, YAML 1.2 numbers, bounded size, paths, threads, chained stages."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from modeling_multimodal import threads
from modeling_multimodal.training.recipe import MAX_RECIPE_BYTES, load_recipe, stage_recipes

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_test.yaml"

BAD_VALUES = [
    # (overrides, fragment of the error)
    (["optim.lr_lm=-0.003"], "optim.lr_lm=-0.003: must be >= 0"),
    (["optim.max_grad_norm=-1"], "optim.max_grad_norm=-1.0: must be > 0"),
    (["optim.max_grad_norm=0"], "optim.max_grad_norm=0.0: must be > 0"),
    (["optim.batch_size=0"], "optim.batch_size=0: must be >= 1"),
    (["optim.batch_size=2.5"], "optim.batch_size=2.5: expected an integer"),
    (["optim.max_steps=true"], "optim.max_steps=True: expected an integer"),
    (["optim.lr_projector=fast"], "optim.lr_projector='fast': expected a number"),
    (["optim.lr_projector=.nan"], "optim.lr_projector=nan: expected a number"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps=-1: must be >= 0"),
    (["optim.gradient_accumulation_steps=0"], "optim.gradient_accumulation_steps=0: must be >= 1"),
    (["stage=pretrain"], "stage='pretrain'; expected one of"),
    (["data.packing=1"], "data.packing=1: expected true or false"),
    (["data.num_workers=-1"], "data.num_workers=-1: must be >= 0"),
    (["data.max_length=0"], "data.max_length=0: must be >= 1"),
    (["data.cache_in_memory=true", "data.num_workers=2"], "data.cache_in_memory needs data.num_workers=0"),
    (["data.train=[{manifest: a.jsonl, max_samples: 0}]"], "data.train[0].max_samples=0: must be >= 1"),
    (["data.train=[{manifest: a.jsonl, repeat: 0}]"], "repeat must be an integer >= 1"),
    (["data.eval=[{manifest: a.jsonl, repeat: 2}]"], "repeat is for data.train only"),
    (["data.train=[{task: image_caption}]"], "expected keys manifest, task"),
    (["lora.r=0"], "lora.r=0: must be >= 1"),
    (["lora.dropout=1"], "lora.dropout=1.0: must be < 1"),
    (["lora.target_modules=(unclosed"], "lora.target_modules='(unclosed': not a valid regex"),
    (["auxiliary_loss_weight=-1"], "auxiliary_loss_weight=-1.0: must be >= 0"),
    (["contrastive_loss_weight=[1]"], "contrastive_loss_weight=[1]: expected a number"),
    (["seed=-1"], "seed=-1: must be >= 0"),
    (["threads=0"], "threads=0: must be >= 1"),
    (["save_total_limit=0"], "save_total_limit=0: must be >= 1"),
    (["logging_steps=0"], "logging_steps=0: must be >= 1"),
    (["resume=1"], "resume=1: expected true or false"),
    (["output_dir="], "output_dir=None: expected a non-empty string"),
    (["optim=3"], "optim=3: expected a mapping"),
    (["model.config.vision_feature_layr=-1"], "Unknown recipe key(s) ['vision_feature_layr'] in model.config;"),
    (["model.config.text_config.hidden_sise=32"], "Unknown recipe key(s) ['hidden_sise'] in model.config.text_config;"),
    (["model.config.audio_config.model_type=whisperr"], "model.config.audio_config.model_type='whisperr': not a model type"),
    (["model.overrides={cross_loss_wieght: 1}"], "Unknown recipe key(s) ['cross_loss_wieght'] in model.overrides"),
    (["model.tokenizer.kind=char"], "model.tokenizer.kind='char'; expected one of ('word', 'bpe')"),
    (["model.tokenizer.size=3"], "Unknown recipe key(s) ['size'] in model.tokenizer"),
    (["stages=[]"], "stages=[]: expected a non-empty list"),
    (["stages=[align, pretrain]"], "stages[1].stage='pretrain'"),
    (["stages=[{stage: align, optim.lr_lm: -1}]"], "stages[0]: optim.lr_lm=-1.0: must be >= 0"),
    (["stages=[{stage: align, optim.lr: 1}]"], "stages[0]: Unknown recipe key(s) ['lr'] in optim"),
    (["stages=[{stage: align, output_dir: elsewhere}]"], "stages[0]: output_dir is set for the whole chain"),
    (["stages=[{optim.max_steps: 3}]"], "stages[0]={'optim.max_steps': 3}: expected a stage name"),
]


@pytest.mark.parametrize("overrides,fragment", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_are_refused_naming_the_key(overrides, fragment):
    with pytest.raises(ValueError) as error:
        load_recipe(RECIPE, overrides)
    assert fragment in str(error.value)


def test_yaml_1_2_numbers(tmp_path):
    """`1e-3` is a string to PyYAML (YAML 1.1) and a number to us; integral floats count as integers."""
    assert yaml.safe_load("x: 1e-3")["x"] == "1e-3"
    recipe = load_recipe(RECIPE, ["optim.lr_projector=1e-3", "optim.max_steps=1e2", "optim.lr_lm=2E-5", "contrastive_loss_weight=1"])
    assert recipe.optim.lr_projector == 0.001 and recipe.optim.lr_lm == 2e-5
    assert recipe.optim.max_steps == 100 and isinstance(recipe.optim.max_steps, int)
    assert isinstance(recipe.contrastive_loss_weight, float)
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.read_text().replace("lr_projector: 0.003", "lr_projector: 3e-3"))
    assert load_recipe(path).optim.lr_projector == 0.003


def test_mixed_precision_no_as_yaml_writes_it():
    """`mixed_precision=no` (YAML 1.1 reads a bare no as false) means no mixed precision; other values stay refused."""
    assert load_recipe(RECIPE, ["mixed_precision=no"]).mixed_precision == "no"
    assert load_recipe(RECIPE, ["mixed_precision=bf16"]).mixed_precision == "bf16"
    with pytest.raises(ValueError, match="mixed_precision=True"):
        load_recipe(RECIPE, ["mixed_precision=yes"])


def test_alias_bomb_and_huge_recipes_are_refused(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nmodel: {config: {}}\ndata: {train: *a8}\n")  # 10^9 values once expanded
    with pytest.raises(ValueError, match="alias bomb"):
        load_recipe(bomb)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * MAX_RECIPE_BYTES + "\n")
    with pytest.raises(ValueError, match="a recipe is at most"):
        load_recipe(huge)
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(RECIPE, ["optim={a: [}"])


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "recipes"
    (folder / "runs" / "aligned" / "final").mkdir(parents=True)
    path = folder / "r.yaml"
    values = yaml.safe_load(RECIPE.read_text())
    values.update(init_from="runs/aligned/final", output_dir="outputs/run")
    values["data"]["root"] = "../data"
    path.write_text(yaml.safe_dump(values))
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert Path(recipe.data.root) == folder / "../data"
    assert recipe.init_from == str(folder / "runs/aligned/final")
    assert recipe.output_dir == "outputs/run"  # the current directory's (documented)
    values["init_from"] = "org/not-a-folder"  # a Hub id stays as given
    path.write_text(yaml.safe_dump(values))
    assert load_recipe(path).init_from == "org/not-a-folder"
    assert load_recipe(path, ["data.root=here"]).data.root == "here"  # command-line overrides: as typed
    values["stages"] = [{"stage": "align", "data.root": "stage_data"}, "finetune"]
    path.write_text(yaml.safe_dump(values))
    first, second = stage_recipes(load_recipe(path))
    assert Path(first.data.root) == folder / "stage_data" and Path(second.data.root) == folder / "../data"


def test_chained_stages_expand_with_their_overrides(tmp_path):
    chain = "stages=[align, {stage: finetune, lora.r: 4, optim.max_steps: 3}]"
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}", "init_from=start/final", chain])
    first, second = stage_recipes(recipe)
    assert (first.stage, first.output_dir, first.init_from) == ("align", str(tmp_path / "1-align"), "start/final")
    assert (second.stage, second.output_dir, second.init_from) == ("finetune", str(tmp_path / "2-finetune"), str(tmp_path / "1-align" / "final"))
    assert (first.lora.r, second.lora.r, first.optim.max_steps, second.optim.max_steps) == (16, 4, 6, 3)


# --- threads --------------------------------------------------------------------------------------------
THREAD_CASES = [
    # (cores in the affinity mask, OMP_NUM_THREADS, LOCAL_WORLD_SIZE, expected)
    (8, None, None, 8),
    (8, None, "2", 4),
    (2, None, "4", 1),
    (8, "3", "2", 3),
]


@pytest.mark.parametrize("cores,omp,local,expected", THREAD_CASES)
def test_threads_follow_the_cores_available_per_process(monkeypatch, cores, omp, local, expected):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(cores)))
    for name, value in (("OMP_NUM_THREADS", omp), ("LOCAL_WORLD_SIZE", local)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert threads.available_threads() == expected


def test_threads_explicit_and_requested(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_requested", None)
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
        threads.set_threads(3, request=True)  # a command's --threads: kept for the trainers it starts
        assert threads.set_threads(None) == 3 and torch.get_num_threads() == 3
        with pytest.raises(ValueError, match="threads=0"):
            threads.set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_cli_threads_and_overwrite_flags_reach_the_recipe(monkeypatch, tmp_path):
    from modeling_multimodal import cli

    seen = {}
    monkeypatch.setattr("modeling_multimodal.training.trainer.train", lambda recipe: seen.setdefault("recipe", recipe) and {})
    assert cli.main(["train", "--recipe", str(RECIPE), "--threads", "1", "--overwrite", f"output_dir={tmp_path}"]) == 0
    assert seen["recipe"].threads == 1 and seen["recipe"].overwrite_output_dir is True
    json.dumps(seen["recipe"].to_dict())


@pytest.mark.parametrize("old, new", [("other_loss_weight", "auxiliary_loss_weight"), ("cross_loss_weight", "contrastive_loss_weight")])
def test_deprecated_loss_weight_keys_still_load(tmp_path, old, new):
    """Old recipe keys load under their current names, with a FutureWarning: in the YAML, an override, a stage."""
    values = yaml.safe_load(RECIPE.read_text())
    values[old] = values.pop(new)
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.warns(FutureWarning, match=f"recipe key {old} is deprecated, use {new}"):
        assert getattr(load_recipe(path), new) == values[old]
    with pytest.warns(FutureWarning, match=f"{old} is deprecated"):
        assert getattr(load_recipe(RECIPE, [f"{old}=0.75"]), new) == 0.75
    with pytest.warns(FutureWarning, match=f"{old} is deprecated"):
        chained = load_recipe(RECIPE, [f"stages=[align, {{stage: finetune, {old}: 0.25}}]"])
        assert [getattr(stage, new) for stage in stage_recipes(chained)] == [getattr(chained, new), 0.25]
