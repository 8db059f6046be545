"""Measuring helpers shared by the benchmarks: interleaved timing, peak memory, machine description.

Noisy machines make absolute times unreliable, so every comparison is timed *interleaved* in one process
(ours, theirs, ours, theirs, ...) and reported as a ratio of medians.

Peak memory on CPU. There is no `max_memory_allocated` for CPU tensors, and `ru_maxrss` is a high-water
mark of the whole process (allocator caches, the Python heap, freed-but-unreturned pages). Instead we run
one step under `torch.profiler` with `profile_memory=True`: every tensor allocation and free becomes a
`[memory]` event with a signed byte count and a timestamp (from every thread, so the autograd engine's
backward thread is included). Their running sum, in time order, is the live tensor memory allocated by the
step; its maximum is the step's peak over what was alive before. Adding the bytes of what was alive before
(parameters, buffers, gradients, optimizer state and the batch) gives the same quantity as
`torch.cuda.max_memory_allocated` after a reset, which is what we read on CUDA.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of `fn` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(fns: dict[str, Callable[[], object]], device: str, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn (a, b, a, b, ...) after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storages counted once)."""
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None or not isinstance(tensor, torch.Tensor):
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def resident_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch: dict | None) -> list[torch.Tensor]:
    """Tensors alive across steps: parameters, buffers, gradients, optimizer state and the batch."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    if batch is not None:
        tensors += [v for v in batch.values() if isinstance(v, torch.Tensor)]
    return tensors


def profiled_peak_bytes(fn: Callable[[], object]) -> int:
    """CPU: peak of the running sum of tensor allocations minus frees while `fn` runs (see module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def memory_at_peak(fn: Callable[[], object]) -> dict[str, int]:
    """Bytes alive at the peak of one call of `fn`, by what they are: parameters, gradients, optimizer state, ...

    Uses torch's memory profiler (`torch.profiler._memory_profiler`, what `export_memory_timeline` draws): it
    follows every tensor through the call and classifies it from the autograd graph and the optimizer
    (PARAMETER, GRADIENT, OPTIMIZER_STATE, ACTIVATION, TEMPORARY, INPUT, AUTOGRAD_DETAIL; UNKNOWN for what it
    cannot place, e.g. an optimizer's scratch tensors). A private API: where it fails, {"unavailable": reason}.
    Call `fn` once before, so the optimizer state exists.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import Action

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
            fn()
        memory = prof._memory_profile()
        live, peak, at_peak = {}, 0, {}
        for _, action, (key, version), size in memory.timeline:
            if action in (Action.PREEXISTING, Action.CREATE):
                live[(key, version)] = size
            elif action == Action.INCREMENT_VERSION:
                live.pop((key, version), None)
                live[(key, version + 1)] = size
            elif action == Action.DESTROY:
                live.pop((key, version), None)
            total = sum(live.values())
            if total > peak:
                peak, at_peak = total, dict(live)
        by_category: dict[str, int] = {}
        for (key, version), size in at_peak.items():
            category = memory._categories.get(key, version)
            name = category.name.lower() if category is not None else "unknown"
            by_category[name] = by_category.get(name, 0) + size
        return dict(sorted(by_category.items(), key=lambda item: -item[1])) | {"total": peak}
    except Exception as error:  # noqa: BLE001 - a private API: report, do not fail the benchmark
        return {"unavailable": f"{type(error).__name__}: {error}"[:200]}


def peak_memory(fn: Callable[[], object], device: str, resident: list[torch.Tensor]) -> dict[str, int]:
    """Peak tensor memory of one call of `fn`: {"peak_bytes": total, "step_bytes": above what was resident}."""
    if device.startswith("cuda"):
        synchronize(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated()
        return {"peak_bytes": peak, "step_bytes": peak - before}
    step = profiled_peak_bytes(fn)
    return {"peak_bytes": tensor_bytes(resident) + step, "step_bytes": step}


def matmul_peak_flops(device: str, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """The machine's achievable matmul FLOP/s: best of `repeats` square `torch.mm` of `size`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best = min(time_call(lambda: torch.mm(a, b), device) for _ in range(repeats))
    return 2 * size**3 / best


def machine_info(device: str) -> dict[str, str | int]:
    """Date, cores, CPU model, torch / transformers versions and (on CUDA) the GPU name."""
    import transformers

    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu_model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu_model)
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, ValueError, subprocess.CalledProcessError):
        nproc = os.cpu_count() or 0
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": nproc,
        "cpu_model": cpu_model,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # at the start: other work on the machine skews every time
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def mib(num_bytes: float) -> float:
    return round(num_bytes / 2**20, 1)
