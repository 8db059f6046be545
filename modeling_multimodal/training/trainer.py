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
import copy
import json
import logging
import time
import uuid
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, DistributedType, gather_object, send_to_device, set_seed
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..evaluation.tasks import evaluate_task
from ..hub import push_checkpoint
from ..data.collator import MultimodalCollator
from ..threads import set_threads
from .calibration import calibrate_projectors, calibration_batches, projectors_to_calibrate
from .checkpointing import gather_full_state, latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .export import export_run, finished, finished_result
from .mixture import ExampleCache, build_train_loader, load_rows
from .model_builder import build_model_and_processor
from .objective import TrainingObjective, freeze_unreachable_parameters, window_item_counts
from .packing import PACKED_ATTENTION, use_per_sample_attention
from .recipe import TrainingRecipe, stage_recipes
from .run_folder import RunLock, prepare_output_dir
from .stages import apply_stage, base_model, parameter_groups
from .tracking import JSONLTracker

logger = logging.getLogger(__name__)

# Samples per training task whose media features set the projectors' input statistics (`training.calibration`).
CALIBRATION_SAMPLES_PER_TASK = 64


# --- the loop -----------------------------------------------------------------------------------------
class Trainer:
    """One run of a recipe (one stage). example_cache: the encoded examples to reuse (`data.cache_in_memory`);
    give the same one to later runs on the same data (a stage chain, the demo) to decode each example once."""

    def __init__(self, recipe: TrainingRecipe, example_cache: ExampleCache | None = None, train_dataset=None, eval_dataset=None):
        """train_dataset / eval_dataset: a `datasets.Dataset` or `DatasetDict` (chat rows in any format of
        `data/formats.py`) that replaces the recipe's data.train / data.eval entries (in this run's copy of the
        recipe: the caller's recipe is left as it was)."""
        if train_dataset is not None or eval_dataset is not None:
            recipe = copy.copy(recipe)
            recipe.data = copy.copy(recipe.data)
            if train_dataset is not None:
                recipe.data.train = [{"manifest": train_dataset}]
            if eval_dataset is not None:
                recipe.data.eval = [{"manifest": eval_dataset}]
        if recipe.stages:
            raise ValueError("a recipe with `stages` runs through train(recipe), which starts one Trainer per stage")
        self.recipe = recipe
        self.example_cache = example_cache if example_cache is not None else ExampleCache()
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
        # Packing on CPU: attention within each sample instead of over the masked row (training/packing.py). On CUDA,
        # flash_attention_2 reads the same boundaries; the per-sample loop there is not measured, so SDPA stays as it is.
        if recipe.data.packing and self.accelerator.device.type == "cpu" and use_per_sample_attention(model):
            logger.info("Packing: the LM attends within each sample (%s) instead of masking the whole row", PACKED_ATTENTION)
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
        accelerator = self.accelerator
        loader, self.batch_sampler = build_train_loader(
            self.recipe, self.processor, self.train_rows, self.example_cache,
            rank=accelerator.process_index, world_size=accelerator.num_processes,
        )
        self.train_dataset = loader.dataset  # `_batches` sets its epoch (augmentation draws by it)
        if self.streaming:  # each rank already reads its own shard (training/streaming.py)
            return loader
        return accelerator.prepare_data_loader(loader)

    @property
    def streaming(self) -> bool:
        return self.recipe.data.streams()

    def _streamed_batches(self, loader, epoch: int, skip: int):
        """`_batches` for streamed data: the sampler replays the first `skip` batches' plan without encoding them."""
        while True:
            self.batch_sampler.set_epoch(epoch)
            self.batch_sampler.skip(skip)
            self.train_dataset.set_epoch(epoch)
            for index, batch in enumerate(loader, start=skip):
                yield epoch, index + 1, send_to_device(batch, self.accelerator.device)
            epoch, skip = epoch + 1, 0

    def _batches(self, loader, epoch: int, skip: int):
        """(epoch, index, batch) forever; the first epoch starts `skip` batches in."""
        if self.streaming:
            yield from self._streamed_batches(loader, epoch, skip)
            return
        while True:
            # Both: the loader's own counter (its __iter__ re-applies it to the samplers it can reach, which is ours
            # in one process) and our sampler directly (several processes wrap it in a BatchSamplerShard that
            # Accelerate's set_epoch does not reach).
            loader.set_epoch(epoch)
            self.batch_sampler.set_epoch(epoch)
            self.train_dataset.set_epoch(epoch)  # augmentation draws per (seed, epoch, index); workers copy it at iter()
            source = self.accelerator.skip_first_batches(loader, skip) if skip else loader
            for index, batch in enumerate(source, start=skip):
                yield epoch, index + 1, batch
            epoch, skip = epoch + 1, 0

    # --- one optimizer step ---
    def _step(self, window: list[dict], contrastive: bool = True) -> dict[str, float]:
        """One optimizer step over a window of micro-batches, every term normalised over the whole window;
        `contrastive=False` leaves `L_contrastive` out of this step (the recipe's `contrastive_every_n_steps`).

        The token, CTC and bag-of-words losses are sums divided by the window's global counts (all ranks), and the
        contrastive loss gathers every rank's pairs, so the update equals the one-process update on the
        same global batch (`losses.MultimodalLoss`, built by the objective with the world size, undoes DDP's average).
        """
        accelerator, objective = self.accelerator, self.objective
        config = base_model(self.model).config
        world, steps = accelerator.num_processes, len(window)
        num_items = window_item_counts(window, lambda counts: accelerator.reduce(counts, "sum"))
        # loss_text, loss_auxiliary, loss_contrastive summed over the window, then how many micro-batches had each term
        totals = torch.zeros(6, device=accelerator.device)
        for i, batch in enumerate(window):
            context = accelerator.no_sync(objective) if i < steps - 1 and world > 1 else contextlib.nullcontext()
            with context:
                out = objective(**batch, num_items=num_items, contrastive=contrastive)
                # the logged figures are the loss's own terms; L_contrastive is the same value on every rank
                for index, (term, share) in enumerate(((out.loss_text, 1), (out.loss_auxiliary, 1), (out.loss_contrastive, steps * world))):
                    if term is not None:
                        totals[index] += term.detach() / share
                        totals[index + 3] += 1
                accelerator.backward(out.loss)
        reduced = accelerator.reduce(totals, "sum").tolist()
        # A term no micro-batch of any rank had is None (not 0) in the logs.
        loss_text, loss_auxiliary, loss_contrastive = (value if seen else None for value, seen in zip(reduced[:3], reduced[3:]))
        grad_norm = 0.0
        if self.recipe.optim.max_grad_norm:
            grad_norm = float(accelerator.clip_grad_norm_(objective.parameters(), self.recipe.optim.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = (loss_text or 0.0) + config.auxiliary_loss_weight * (loss_auxiliary or 0.0) + config.contrastive_loss_weight * (loss_contrastive or 0.0)
        return {
            "loss": loss,
            "loss_text": loss_text,
            "loss_auxiliary": loss_auxiliary,
            "loss_contrastive": loss_contrastive,
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens": float(num_items["text"]),
        }

    # --- evaluation ---
    def evaluate(self, step: int) -> dict:
        """Score data.eval: every rank evaluates its share of the rows and gets every score (`evaluation.distributed`)."""
        results, samples = {}, {}
        model = base_model(self.model)
        with _unsharded_root(self.objective):
            for task, rows in self.eval_rows:
                limit = self.recipe.data.eval_max_samples
                subset = [rows[i] for i in range(min(len(rows), limit or len(rows)))]
                scores, examples = evaluate_task(model, self.processor, subset, task, distributed=True)
                name = task or "chat"
                results.update({f"{name}/{k}": v for k, v in scores.items()})
                samples[name] = examples
        self.eval_history.append({"step": step, **results})  # on every rank: a checkpoint saves rank 0's copy
        self.accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=step)
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
        checkpoint = prepare_output_dir(self.output_dir, recipe.resume, recipe.overwrite_output_dir, accelerator.is_main_process)
        accelerator.wait_for_everyone()  # the main process may have cleared the folder
        # Fused AdamW (transformers' Trainer default since torch 2.8): one kernel per group, and no temporaries; the
        # single-tensor path allocates two copies of the largest trainable tensor at every step (2 × 113 MB for
        # SmolLM2's embedding, trained fully), the step's memory peak. FSDP2 / DeepSpeed keep their own optimizers' paths.
        fused = accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, optim), fused=fused or None)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, optim.warmup_steps, optim.max_steps)
        loader = self._train_loader()
        if checkpoint is None and projectors_to_calibrate(self.model):
            collate = MultimodalCollator(pad_token_id=self.processor.tokenizer.pad_token_id, padding_side="right")
            seen = calibrate_projectors(
                self.model,
                calibration_batches(
                    self.train_dataset.calibration_parts(CALIBRATION_SAMPLES_PER_TASK), collate, CALIBRATION_SAMPLES_PER_TASK,
                    optim.batch_size,
                ),
                reduce=lambda t: accelerator.reduce(t, "sum"),
            )
            logger.info("Projector input statistics from %s feature rows", seen)
        # The objective is what runs each step, so it is what DDP / FSDP2 / ZeRO-3 wrap; self.model stays the
        # model inside it (FSDP2 shards it in place), which checkpoints and exports save under its own names.
        self.objective = TrainingObjective(self.model, run_language_model=recipe.stage != "encoders", world_size=accelerator.num_processes)
        self.objective, self.optimizer = accelerator.prepare(self.objective, self.optimizer)
        accelerator.init_trackers("train", config=_flat(recipe.to_dict()))

        step, epoch, skip, rng = 0, 0, 0, None
        self.run_id = uuid.uuid4().hex
        if checkpoint is not None:
            state, rng = load_checkpoint(
                checkpoint, self.model, _torch_optimizer(self.optimizer), self.scheduler, accelerator.process_index
            )
            step, epoch, skip = state["step"], state["epoch"], state["batch"]
            if "positions" in state:  # streamed data: each rank's own position in its shard
                epoch, skip = _rank_position(state["positions"], accelerator.process_index, accelerator.num_processes, checkpoint)
            self.log_history, self.eval_history = state["log_history"], state["eval_history"]
            self.run_id = state.get("run_id") or self.run_id
            if accelerator.is_main_process:  # trackers live on the main process (other ranks get a stub)
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
            metrics = self._step(batches_in_window, contrastive=(step + 1) % recipe.contrastive_every_n_steps == 0)
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
            paths["hub_commit"] = push_checkpoint(paths["final_dir"], recipe.push_to_hub, private=recipe.hub_private).oid
        accelerator.end_training()
        return {"steps": step, "seconds": elapsed, "final_loss": self.log_history[-1]["loss"] if self.log_history else None, **final, **paths}

    def _save_checkpoint(self, step: int, epoch: int, batch_index: int):
        accelerator = self.accelerator
        # Streamed shards end their epochs apart, so every rank's position is kept (the indexed ranks move together).
        positions = gather_object([[epoch, batch_index]]) if self.streaming else None
        save_checkpoint(
            self.output_dir,
            step,
            self.model,
            _torch_optimizer(self.optimizer),
            self.scheduler,
            {
                "step": step, "epoch": epoch, "batch": batch_index, "run_id": self.run_id,
                "log_history": self.log_history, "eval_history": self.eval_history,
                **({"positions": positions} if positions is not None else {}),
            },
            rank=accelerator.process_index,
            is_main=accelerator.is_main_process,
            total_limit=self.recipe.save_total_limit,
            wait_for_everyone=accelerator.wait_for_everyone,
        )

    def _save_final(self, final: dict) -> dict:
        """final/ and the rest of `export.export_run`; every rank takes part in gathering FSDP2 shards."""
        self.accelerator.wait_for_everyone()
        # FSDP2 parameters are shards: gather full tensors (every rank takes part) for rank 0 to save.
        sharded = any(isinstance(p, DTensor) for p in self.model.parameters())
        full_state = gather_full_state(self.model) if sharded else None
        if not self.accelerator.is_main_process:
            return {"final_dir": str(self.output_dir / "final")}
        return export_run(
            self.output_dir, self.model, self.processor, self.recipe, final, self.log_history, self.eval_history, full_state
        )


def _rank_position(positions, rank: int, world_size: int, checkpoint) -> tuple[int, int]:
    """(epoch, batch) of this rank in a streamed run's checkpoint; its shards exist only for the same process count."""
    if not isinstance(positions, list) or len(positions) != world_size:
        saved = len(positions) if isinstance(positions, list) else positions
        raise ValueError(
            f"{checkpoint}: a streamed run's data positions are per process ({saved} saved) and this run has {world_size} "
            "processes; resume streamed data with the process count it was saved with"
        )
    epoch, batch = positions[rank]
    return int(epoch), int(batch)


@contextlib.contextmanager
def _unsharded_root(objective):
    """Under FSDP2, the root unit's parameters (embeddings, projectors, LM head: whatever no per-layer unit holds)
    gathered while the model is called directly, as evaluation does (the root's own forward hook would gather them
    for the objective's forward only); the per-layer units gather themselves in their forward hooks."""
    if not isinstance(objective, FSDPModule):
        yield
        return
    objective.unshard()
    try:
        yield
    finally:
        objective.reshard()


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


def train(recipe: TrainingRecipe, example_cache: ExampleCache | None = None) -> dict:
    """Train `recipe`, or each stage of its `stages` chain in turn; returns the (last) run's result.

    The stages share one `ExampleCache` (with `data.cache_in_memory`), so each example is decoded once for
    the chain; pass one to share it with later calls too.
    """
    example_cache = example_cache if example_cache is not None else ExampleCache()
    if not recipe.stages:
        return Trainer(recipe, example_cache).train()
    result = None
    for stage in stage_recipes(recipe):
        if recipe.resume and finished(stage):
            logger.info("Stage %s in %s is finished; not run again", stage.stage, stage.output_dir)
            result = finished_result(stage)
            continue
        stage.resume = recipe.resume and latest_checkpoint(stage.output_dir) is not None
        result = Trainer(stage, example_cache).train()
    return result
