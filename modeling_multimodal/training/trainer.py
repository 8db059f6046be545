"""The training loop: Accelerate, stages, the three loss terms, exact resume, evaluation and reports.

What a reader should know:
- Loss normalisation is global. Each optimizer step gathers its K micro-batches first, counts the
  labelled tokens of the whole window on every rank, and every micro-batch divides its summed token
  loss by that count. Gradient accumulation and data parallelism then weigh every token equally
  (a 2-process run equals the 1-process run with the same global batch).
- Every rank runs every module in every step (the `TrainingObjective`'s zero-weight touch pass), so
  mixed-modality batches do not hang DDP / FSDP / ZeRO-3, and one process gives its optimizer the same
  zero gradients as several would; parameters no forward can reach are frozen before wrapping.
- Resume is exact: trainable weights, optimizer, scheduler, each rank's RNG and the data position
  (epoch, batch) are restored; the sampler is seeded per epoch, and so is the prepared loader's counter
  (Accelerate's `DataLoaderShard` re-applies its own epoch on every `__iter__`, and a resumed process
  would restart that counter at 0). A checkpoint is written after the next window is
  fetched and RNG is restored after the resumed iterator fetches its first window, so both runs draw
  their step's randomness from the same state: the loss curve after a resume equals an uninterrupted run.
- One run per output folder (`run_folder.py`): a lock held for the run, no new run over another run's
  checkpoints, no `--resume` without a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import uuid
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..configuration import MultimodalConfig
from ..modeling_multimodal import MultimodalForConditionalGeneration
from ..processing.processing_multimodal import MultimodalProcessor
from ..threads import set_threads
from ..tokenization import build_tokenizer
from .checkpointing import gather_full_state, latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .collator import LengthGroupedBatchSampler, MultimodalCollator
from .data import EncodedDataset, ExampleEncoder, build_example, get_task, load_manifest
from .objective import TrainingObjective, freeze_unreachable_parameters, window_item_counts
from .packing import PackedBatchSampler, PackingCollator
from .recipe import TrainingRecipe, stage_recipes
from .run_folder import RunLock, prepare_output_dir
from .stages import apply_stage, base_model, parameter_groups
from .tracking import JSONLTracker

logger = logging.getLogger(__name__)



# --- model and data ---------------------------------------------------------------------------------
def _corpus(rows_by_task) -> list[str]:
    """Every text a from-scratch tokenizer must know: prompts, responses, paired texts, chat roles."""
    texts = ["user: assistant: system:"]
    for task, rows in rows_by_task:
        spec = get_task(task)
        if spec is not None:
            texts.append(spec.prompt)
        for row in rows:
            example = build_example(row, task)
            texts += [t for t in (example["response"], example["pair_text"], example["ctc_text"]) if t]
            for message in example["prompt"]:
                content = message["content"]
                texts += [content] if isinstance(content, str) else [i["text"] for i in content if i.get("type") == "text"]
    return texts


def build_model_and_processor(recipe: TrainingRecipe, rows_by_task=()) -> tuple[MultimodalForConditionalGeneration, MultimodalProcessor]:
    """The recipe's model: a previous run (`init_from`), a checkpoint, pretrained components, or a config from scratch."""
    spec = recipe.model
    source = recipe.init_from or spec.checkpoint
    # λ and α go into the config before the model is built: the auxiliary heads exist only when λ > 0.
    loss_weights = {
        name: float(getattr(recipe, name)) for name in ("other_loss_weight", "cross_loss_weight") if getattr(recipe, name) is not None
    }
    overrides = {**spec.overrides, **loss_weights}
    if source:
        model = MultimodalForConditionalGeneration.from_pretrained(source, **overrides)
        processor = MultimodalProcessor.from_pretrained(source)
    elif spec.components is not None:
        model, processor = MultimodalForConditionalGeneration.from_pretrained_components(**spec.components, **overrides)
    else:
        tokenizer_spec = dict(spec.tokenizer or {"kind": "word"})
        tokenizer = build_tokenizer(_corpus(rows_by_task), **tokenizer_spec)
        config_values = json.loads(json.dumps(spec.config))  # a deep copy
        text = config_values.setdefault("text_config", {"model_type": "llama"})
        text.update(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        ids = {m: tokenizer.convert_tokens_to_ids(f"<{m}>") for m in ("image", "audio", "video")}
        if config_values.get("vision_config") is not None:
            config_values.setdefault("image_token_id", ids["image"])
            config_values.setdefault("video_token_id", ids["video"])
        if config_values.get("audio_config") is not None:
            config_values.setdefault("audio_token_id", ids["audio"])
        config = MultimodalConfig(**{**config_values, **loss_weights})
        model = MultimodalForConditionalGeneration(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        processor = MultimodalProcessor.from_config_and_components(config, tokenizer)
    if recipe.stage == "encoders" and model.config.other_loss_weight <= 0:
        raise ValueError("stage=encoders trains on L_other alone: set other_loss_weight (λ) > 0")
    if model.config.other_loss_weight > 0 and not model.config.active_auxiliary_tasks:
        raise ValueError(
            "other_loss_weight (λ) > 0 but the model has no auxiliary head (audio_ctc needs an audio tower, media_bow any media tower)"
        )
    return model, processor


def load_rows(recipe: TrainingRecipe, entries: list[dict], training: bool = True) -> list[tuple[str, object]]:
    """[(task, datasets.Dataset)] for the recipe's manifest entries, paths resolved against data.root.

    A training entry's `repeat` (applied by the training loader) weights a task in the
    mixture: its rows appear that many times per epoch, each decoded once when examples are cached. An
    evaluation entry scores each row once, so `repeat` there is refused rather than ignored.
    """
    loaded = []
    for entry in entries:  # checked by the recipe (`check_data_entries`)
        rows = load_manifest(Path(recipe.data.root) / entry["manifest"], root=recipe.data.root, task=entry.get("task"))
        if entry.get("max_samples"):
            rows = rows.select(range(min(len(rows), int(entry["max_samples"]))))
        loaded.append((entry.get("task"), rows))
    return loaded


def encoding_fingerprint(part: EncodedDataset) -> str:
    """What decides a part's encoded examples: its rows, the task, max_length and the whole processor."""
    encoder, digest = part.encoder, hashlib.sha256()
    tokenizer = encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    settings = json.loads(encoder.processor.to_json_string())
    for sub in [settings, *(v for v in settings.values() if isinstance(v, dict))]:
        sub.pop("auto_map", None)  # where the code lives (added when a checkpoint is exported), not what it does
    for text in (json.dumps(settings, sort_keys=True), vocabulary, repr(encoder.task), repr(encoder.max_length)):
        digest.update(text.encode() + b"\0")
    for row in part.rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode() + b"\0")
    return digest.hexdigest()


# Memoised examples of the last data set a Trainer of this process encoded with `data.cache_in_memory`:
# chained stages (the demo's four) and repeated runs on the same data decode each media file once.
_SHARED_CACHE: dict = {"key": None, "examples": {}}


class _MixedDataset(torch.utils.data.Dataset):
    """Several tasks' encoded datasets behind one index, optionally memoised (decoding media once).

    The memo is shared with later Trainers of the same process while the data, tasks and processor are
    the same (`encoding_fingerprint`); a different data set replaces it, so at most one is kept.
    """

    def __init__(self, parts: list[EncodedDataset], cache: bool = False, repeats: list[int] | None = None):
        self.parts = parts
        self.offsets = [0]
        for part, repeat in zip(parts, repeats or [1] * len(parts)):
            self.offsets.append(self.offsets[-1] + len(part) * repeat)
        self.cache = None
        if cache:
            key = tuple(encoding_fingerprint(part) for part in parts)
            if _SHARED_CACHE["key"] != key:
                _SHARED_CACHE.update(key=key, examples={})
            self.cache = _SHARED_CACHE["examples"]

    def __len__(self):
        return self.offsets[-1]

    def __getitem__(self, index):
        part = next(i for i in range(len(self.parts)) if index < self.offsets[i + 1])
        key = (part, (index - self.offsets[part]) % len(self.parts[part]))  # a repeated row is one example
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        example = self.parts[key[0]][key[1]]
        if self.cache is not None:
            self.cache[key] = example
        return example


# --- the loop -----------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, recipe: TrainingRecipe):
        if recipe.stages:
            raise ValueError("a recipe with `stages` runs through train(recipe), which starts one Trainer per stage")
        self.recipe = recipe
        self.output_dir = Path(recipe.output_dir)
        # Accelerate keeps one global state per process; a second Trainer in the same process (a notebook,
        # the demo's stages, tests) may ask for another mixed precision, so start from a clean one.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            # Without a GPU, `cpu=True` lets torchrun / `accelerate launch --multi_gpu` start a real gloo group
            # (otherwise Accelerate quietly runs each process alone).
            cpu=not torch.cuda.is_available(),
            mixed_precision=recipe.mixed_precision,
            # Each global batch is split across processes (so n processes equal one at the same global batch);
            # packed batches vary in sample count, so with packing each process draws its own batches of rows.
            dataloader_config=DataLoaderConfiguration(split_batches=not recipe.data.packing),
            log_with=[JSONLTracker(self.output_dir / "logs"), "tensorboard"],
            project_dir=str(self.output_dir / "logs"),
        )
        set_threads(recipe.threads)
        set_seed(recipe.seed)
        self.train_rows = load_rows(recipe, recipe.data.train)
        self.eval_rows = load_rows(recipe, recipe.data.eval, training=False)
        model, self.processor = build_model_and_processor(recipe, self.train_rows)
        self.model = self._prepare_model(model)
        self.log_history: list[dict] = []
        self.eval_history: list[dict] = []

    def _prepare_model(self, model):
        recipe = self.recipe
        model = apply_stage(model, recipe)
        unused = freeze_unreachable_parameters(base_model(model))
        if unused:
            logger.info("Froze %d parameters no forward pass reaches (e.g. %s)", len(unused), unused[0])
        if recipe.gradient_checkpointing:
            base_model(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    # --- data ---
    def _train_loader(self):
        recipe = self.recipe
        parts, lengths, repeats = [], [], [entry.get("repeat", 1) for entry in recipe.data.train]
        for (task, rows), repeat in zip(self.train_rows, repeats):
            encoder = ExampleEncoder(self.processor, task, max_length=recipe.data.max_length)
            parts.append(EncodedDataset(rows, encoder))
            lengths += encoder.estimate_lengths(rows) * repeat
        dataset = _MixedDataset(parts, cache=recipe.data.cache_in_memory, repeats=repeats)
        pad_id = self.processor.tokenizer.pad_token_id
        batch_size = recipe.optim.batch_size
        if recipe.data.packing:  # batch_size counts packed rows
            collator = PackingCollator(pad_token_id=pad_id, max_length=recipe.data.max_length)
            self.batch_sampler = PackedBatchSampler(lengths, recipe.data.max_length, rows_per_batch=batch_size, seed=recipe.seed)
        else:
            collator = MultimodalCollator(pad_token_id=pad_id, padding_side="right")
            groups = 50 if recipe.data.group_by_length else 1
            self.batch_sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=recipe.seed, group_batches=groups)
        loader = DataLoader(
            dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=collator,
            num_workers=recipe.data.num_workers,
            generator=torch.Generator().manual_seed(recipe.seed),  # keeps the global RNG (dropout) untouched
        )
        return self.accelerator.prepare_data_loader(loader)

    def _batches(self, loader, epoch: int, skip: int):
        """(epoch, index, batch) forever; the first epoch starts `skip` batches in."""
        while True:
            # Both: the loader's own counter (its __iter__ re-applies it to the samplers it can reach, which is ours
            # in one process) and our sampler directly (several processes wrap it in a BatchSamplerShard that
            # Accelerate's set_epoch does not reach).
            loader.set_epoch(epoch)
            self.batch_sampler.set_epoch(epoch)
            source = self.accelerator.skip_first_batches(loader, skip) if skip else loader
            for index, batch in enumerate(source, start=skip):
                yield epoch, index + 1, batch
            epoch, skip = epoch + 1, 0

    # --- one optimizer step ---
    def _step(self, window: list[dict]) -> dict[str, float]:
        """One optimizer step over a window of micro-batches, every term normalised over the whole window.

        The token, CTC and bag-of-words losses are sums divided by the window's global counts (all ranks), and the
        contrastive loss gathers every rank's pairs, so the update equals the one-process update on the
        same global batch. `total` multiplies the summed terms by the world size to undo DDP's average.
        """
        accelerator, objective = self.accelerator, self.objective
        config = base_model(self.model).config
        world, steps = accelerator.num_processes, len(window)
        num_items = window_item_counts(window, lambda counts: accelerator.reduce(counts, "sum"))
        # loss_text, loss_other, loss_cross summed over the window, then how many micro-batches had each term
        totals = torch.zeros(6, device=accelerator.device)
        for i, batch in enumerate(window):
            context = accelerator.no_sync(objective) if i < steps - 1 and world > 1 else contextlib.nullcontext()
            with context:
                out = objective(**batch, num_items=num_items, gather=world > 1)
                total = 0.0 * out.loss  # zero, but keeps every module the forward touched in the graph
                if out.loss_text is not None:
                    total = total + world * out.loss_text
                    totals[0] += out.loss_text.detach()
                    totals[3] += 1
                if out.loss_other is not None:
                    total = total + world * config.other_loss_weight * out.loss_other
                    totals[1] += out.loss_other.detach()
                    totals[4] += 1
                if out.loss_cross is not None:
                    total = total + config.cross_loss_weight * out.loss_cross / steps
                    totals[2] += out.loss_cross.detach() / steps / world  # the same value on every rank
                    totals[5] += 1
                accelerator.backward(total)
        reduced = accelerator.reduce(totals, "sum").tolist()
        # A term no micro-batch of any rank had is None (not 0) in the logs.
        loss_text, loss_other, loss_cross = (value if seen else None for value, seen in zip(reduced[:3], reduced[3:]))
        grad_norm = 0.0
        if self.recipe.optim.max_grad_norm:
            grad_norm = float(accelerator.clip_grad_norm_(objective.parameters(), self.recipe.optim.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = (loss_text or 0.0) + config.other_loss_weight * (loss_other or 0.0) + config.cross_loss_weight * (loss_cross or 0.0)
        return {
            "loss": loss,
            "loss_text": loss_text,
            "loss_other": loss_other,
            "loss_cross": loss_cross,
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens": float(num_items["text"]),
        }

    # --- evaluation ---
    def evaluate(self, step: int) -> dict:
        from ..evaluation.tasks import evaluate_task

        results, samples = {}, {}
        model = base_model(self.model)
        if self.accelerator.is_main_process:
            for task, rows in self.eval_rows:
                limit = self.recipe.data.eval_max_samples
                subset = [rows[i] for i in range(min(len(rows), limit or len(rows)))]
                scores, examples = evaluate_task(model, self.processor, subset, task)
                name = task or "chat"
                results.update({f"{name}/{k}": v for k, v in scores.items()})
                samples[name] = examples
            record = {"step": step, **results}
            self.eval_history.append(record)
            self.accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=step)
        self.accelerator.wait_for_everyone()
        return {"scores": results, "samples": samples}

    # --- main ---
    def train(self) -> dict:
        """Train under the output folder's lock (released however training ends)."""
        lock = RunLock(self.output_dir) if self.accelerator.is_main_process else None
        try:
            return self._train()
        finally:
            if lock is not None:
                lock.release()

    def _train(self) -> dict:
        recipe, accelerator = self.recipe, self.accelerator
        optim = recipe.optim
        if accelerator.distributed_type == DistributedType.DEEPSPEED and (recipe.save_steps or recipe.resume):
            raise ValueError(
                "save_steps / resume under DeepSpeed: checkpoints gather through torch.distributed.checkpoint, which does "
                "not know ZeRO-3's partitions; use FSDP2 (examples/accelerate/fsdp.yaml) for a run that must resume"
            )
        if accelerator.distributed_type == DistributedType.FSDP:
            if recipe.stage == "finetune":
                raise ValueError(
                    "stage=finetune under FSDP: the final export merges the LoRA adapter into the model, which is not "
                    "implemented for sharded parameters; train stage=full (or align) under FSDP, or finetune with DDP"
                )
            if recipe.data.eval:  # evaluation runs on the main process alone: a sharded forward would wait for the others
                raise ValueError(
                    "data.eval under FSDP: evaluation is not sharded; set data.eval=[] and score final/ afterwards "
                    "with `modeling-multimodal evaluate`"
                )
        checkpoint = prepare_output_dir(self.output_dir, recipe.resume, recipe.overwrite_output_dir, accelerator.is_main_process)
        accelerator.wait_for_everyone()  # the main process may have cleared the folder
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, optim))
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, optim.warmup_steps, optim.max_steps)
        loader = self._train_loader()
        # The objective is what runs each step, so it is what DDP / FSDP2 / ZeRO-3 wrap; self.model stays the
        # model inside it (FSDP2 shards it in place), which checkpoints and exports save under its own names.
        self.objective = TrainingObjective(self.model, run_language_model=recipe.stage != "encoders")
        self.objective, self.optimizer = accelerator.prepare(self.objective, self.optimizer)
        accelerator.init_trackers("train", config=_flat(recipe.to_dict()))

        step, epoch, skip, rng = 0, 0, 0, None
        self.run_id = uuid.uuid4().hex
        if checkpoint is not None:
            state, rng = load_checkpoint(
                checkpoint, self.model, _torch_optimizer(self.optimizer), self.scheduler, accelerator.process_index
            )
            step, epoch, skip = state["step"], state["epoch"], state["batch"]
            self.log_history, self.eval_history = state["log_history"], state["eval_history"]
            self.run_id = state.get("run_id") or self.run_id
            accelerator.get_tracker("jsonl", unwrap=False).drop_after(step)  # those steps are logged again
            logger.info("Resumed from %s at step %d", checkpoint, step)
        batches = self._batches(loader, epoch, skip)
        window_source = _windows(batches, optim.gradient_accumulation_steps)
        first_window = next(window_source) if step < optim.max_steps else None
        if rng is not None:
            set_rng_state(rng)  # after the data iterator drew its seeds, exactly as at the checkpoint
        self.objective.train()
        progress = tqdm(total=optim.max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
        window = first_window
        started = time.perf_counter()
        while step < optim.max_steps:
            position, batches_in_window = window
            metrics = self._step(batches_in_window)
            step += 1
            epoch, batch_index = position
            metrics["step"] = step
            metrics["epoch"] = epoch
            self.log_history.append(metrics)
            if step % max(recipe.logging_steps, 1) == 0 or step == optim.max_steps:
                accelerator.log({f"train/{k}": v for k, v in metrics.items() if k != "step" and v is not None}, step=step)
                progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            progress.update(1)
            if recipe.eval_steps and step % recipe.eval_steps == 0 and step < optim.max_steps and self.eval_rows:
                self.evaluate(step)
            # Fetch the next window before saving: a resumed run restores RNG after its first fetch.
            next_window = next(window_source) if step < optim.max_steps else None
            if recipe.save_steps and (step % recipe.save_steps == 0 or step == optim.max_steps):
                self._save_checkpoint(step, epoch, batch_index)  # also at the end: a later run can extend max_steps
            window = next_window
        progress.close()
        elapsed = time.perf_counter() - started
        final = self.evaluate(step) if self.eval_rows else {"scores": {}, "samples": {}}
        paths = self._save_final(final)
        if recipe.push_to_hub and accelerator.is_main_process:
            from ..hub import push_checkpoint

            paths["hub_commit"] = push_checkpoint(paths["final_dir"], recipe.push_to_hub, private=recipe.hub_private).oid
        accelerator.end_training()
        return {"steps": step, "seconds": elapsed, "final_loss": self.log_history[-1]["loss"] if self.log_history else None, **final, **paths}

    def _save_checkpoint(self, step: int, epoch: int, batch_index: int):
        accelerator = self.accelerator
        save_checkpoint(
            self.output_dir,
            step,
            self.model,
            _torch_optimizer(self.optimizer),
            self.scheduler,
            {
                "step": step, "epoch": epoch, "batch": batch_index, "run_id": self.run_id,
                "log_history": self.log_history, "eval_history": self.eval_history,
            },
            rank=accelerator.process_index,
            is_main=accelerator.is_main_process,
            total_limit=self.recipe.save_total_limit,
            wait_for_everyone=accelerator.wait_for_everyone,
        )

    def _save_final(self, final: dict) -> dict:
        """final/: a merged model + processor that `from_pretrained` loads; final/adapter/: the LoRA adapter."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        paths = {"final_dir": str(self.output_dir / "final")}
        model = self.model
        # FSDP2 parameters are shards: gather full tensors (every rank takes part) for rank 0 to save.
        full_state = gather_full_state(model) if any(isinstance(p, DTensor) for p in model.parameters()) else None
        if not accelerator.is_main_process:
            return paths
        final_dir = self.output_dir / "final"
        if hasattr(model, "merge_and_unload"):
            model.save_pretrained(final_dir / "adapter")
            paths["adapter_dir"] = str(final_dir / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(final_dir, state_dict=full_state)
        self.processor.save_pretrained(final_dir)
        (final_dir / "training_recipe.json").write_text(json.dumps(self.recipe.to_dict(), indent=2))
        (final_dir / "eval_results.json").write_text(json.dumps(final, indent=2, default=str))
        from ..hub import save_custom_code, training_card_inputs, write_model_card_inputs

        save_custom_code(final_dir)  # flat code + auto_map: final/ loads where the package is not installed
        card_inputs = training_card_inputs(self.recipe.to_dict(), model.config.to_dict(), final["scores"])
        write_model_card_inputs(final_dir, **card_inputs)  # what `modeling-multimodal push` puts on the card
        (self.output_dir / "log_history.json").write_text(json.dumps({"train": self.log_history, "eval": self.eval_history}, indent=2))
        if self.recipe.report:
            from .report import write_report

            paths["report"] = str(write_report(self.log_history, self.eval_history, self.output_dir / "report.png"))
        return paths


def _torch_optimizer(optimizer):
    """The torch optimizer inside Accelerate's wrapper (what `torch.distributed.checkpoint.state_dict` expects)."""
    return getattr(optimizer, "optimizer", optimizer)


def _windows(batches, size: int):
    """Group micro-batches into optimizer-step windows: ((epoch, next batch index), [batches])."""
    while True:
        window, position = [], None
        for _ in range(size):
            epoch, index, batch = next(batches)
            window.append(batch)
            position = (epoch, index)
        yield position, window


def _flat(values: dict, prefix: str = "") -> dict:
    """Nested recipe -> flat {a.b: value} of scalars, for trackers' hyper-parameter tables."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value if value is not None else "None"
        else:
            flat[name] = json.dumps(value)
    return flat


def train(recipe: TrainingRecipe) -> dict:
    """Train `recipe`, or each stage of its `stages` chain in turn; returns the (last) run's result."""
    if not recipe.stages:
        return Trainer(recipe).train()
    result = None
    for stage in stage_recipes(recipe):
        if recipe.resume and finished(stage):
            logger.info("Stage %s in %s is finished; not run again", stage.stage, stage.output_dir)
            result = finished_result(stage)
            continue
        stage.resume = recipe.resume and latest_checkpoint(stage.output_dir) is not None
        result = Trainer(stage).train()
    return result


def finished(recipe: TrainingRecipe) -> bool:
    """Whether a run wrote its final/ model after all its steps (its log history is written last)."""
    history = Path(recipe.output_dir) / "log_history.json"
    if not (Path(recipe.output_dir) / "final" / "eval_results.json").is_file() or not history.is_file():
        return False
    records = json.loads(history.read_text())["train"]
    return bool(records) and records[-1]["step"] >= recipe.optim.max_steps


def finished_result(recipe: TrainingRecipe) -> dict:
    """`Trainer.train()`'s result for a finished run, from its files."""
    output_dir = Path(recipe.output_dir)
    records = json.loads((output_dir / "log_history.json").read_text())["train"]
    evaluation = json.loads((output_dir / "final" / "eval_results.json").read_text())
    paths = {"final_dir": str(output_dir / "final")}
    if (output_dir / "final" / "adapter").is_dir():
        paths["adapter_dir"] = str(output_dir / "final" / "adapter")
    if (output_dir / "report.png").is_file():
        paths["report"] = str(output_dir / "report.png")
    return {"steps": records[-1]["step"], "seconds": 0.0, "final_loss": records[-1]["loss"], **evaluation, **paths}
