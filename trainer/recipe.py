"""The recipe of a run: its precision and whether it is compiled, measured on this machine.

Which is fastest depends on the machine, not on its CPU flags: bf16 autocast ran 2.1x fp32
on one AMD Zen 4 and 0.73x on an Intel Xeon that also lists avx512_bf16. So `precision: auto`
and `compile: auto` are decided by a probe: a few training steps of the run's own model shape
and batch, per candidate, timed. The figures are cached per machine and shape in the cache
dir, so the probe is paid once; a run too short to pay for a probe uses the cache, or fp32
eager. bf16 is chosen only when it is measured faster by BF16_MARGIN and its loss after the
probe's steps stays within LOSS_TOLERANCE of fp32's; compile only when the measured saving
per step, over the run's steps, pays back the measured compile time.

The decision (`decide`) is plain code over measured Trials, so tests inject the timings; the
probe itself (`measure`) is passed in by trainer.train. MFU's two numbers live here too:
the model's FLOPs per token and the device's peak, measured once by a GEMM probe.
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec

from protocol.settings import Compile
from trainer.jsonfile import dumps, read_json

Precision = Literal["fp32", "bf16", "fp16"]

RECIPE_VERSION = 1
# A run probes only when it is long enough for the probe (PROBE_STEPS per candidate, ~12
# steps) to cost under 3% of it; shorter runs use what an earlier run measured, or fp32.
PROBE_MIN_STEPS = 400
PROBE_WARMUP = 2  # steps not timed (allocator, oneDNN kernel choice; compiling)
PROBE_STEPS = 6  # steps per candidate, warm-up included
BF16_MARGIN = 1.10  # bf16 must be at least this much faster than fp32 ...
LOSS_TOLERANCE = 0.02  # ... and its probe loss within 2% of fp32's
# Compiling is measured only in a run long enough that a compile which turns out not to pay
# costs under 3% of it: compiling a tiny GPT-2 took 46 s on 2 cores, to run slower there.
# The compile time is assumed until measured once on this machine and shape (then cached).
COMPILE_PROBE_SHARE = 0.03
COMPILE_ASSUMED_S = 45.0


class Trial(msgspec.Struct, kw_only=True):
    """One candidate, measured: a few training steps of the run's shape."""

    precision: Precision
    compile: bool
    step_s: float  # median seconds per optimizer step after the warm-up
    loss: float | None  # held-out loss after the probe's steps; None when not finite
    compile_s: float = 0.0  # what compiling added to the first steps


class Recipe(msgspec.Struct, kw_only=True):
    """What a run trains with, and why (recorded in the manifest, checkpoints, train.started)."""

    precision: Precision
    compile: bool
    reason: str
    trials: list[Trial] = []
    measured: bool = False  # the probe ran for this run (not read from the cache)
    machine: str = ""  # where the trials were measured (trainer.recipe.machine_id)
    shape: str = ""  # of what: the model config, batch and optimizer (the cache's key)


class ProbeFile(msgspec.Struct, kw_only=True):
    """<cache>/recipes/<key>.json: what was measured for one machine and model shape."""

    format: str = "mt-recipe-probe"
    version: int = RECIPE_VERSION
    machine: str
    shape: str
    trials: list[Trial] = []


class PeakFile(msgspec.Struct, kw_only=True):
    """<cache>/recipes/peak-<key>.json: the device's measured GEMM FLOP/s per precision."""

    format: str = "mt-peak-flops"
    version: int = RECIPE_VERSION
    machine: str
    flops: dict[str, float] = {}


Measure = Callable[[Precision, bool], Trial]


# ---------------------------------------------------------------------------- the decision


def _find(trials: list[Trial], precision: Precision, compiled: bool) -> Trial | None:
    for t in trials:
        if t.precision == precision and t.compile == compiled:
            return t
    return None


def _close(loss: float | None, ref: float | None) -> bool:
    if loss is None or ref is None:
        return loss is None and ref is None
    return abs(loss - ref) <= LOSS_TOLERANCE * abs(ref)


def decide(
    candidates: list[Precision],
    want_compile: Compile,
    total_steps: int,
    known: list[Trial],
    measure: Measure | None,
) -> Recipe:
    """Pick the precision among candidates (the first is the safe default) and whether to
    compile. `known` are cached trials; `measure` runs a missing one, or is None when this
    run may not probe (too short): then only known trials count."""
    trials = list(known)
    fresh = False

    def trial(precision: Precision, compiled: bool) -> Trial | None:
        nonlocal fresh
        found = _find(trials, precision, compiled)
        if found is None and measure is not None:
            found = measure(precision, compiled)
            trials.append(found)
            fresh = True
        return found

    precision, why = candidates[0], [f"{candidates[0]} (asked for)"]
    if len(candidates) > 1:
        precision, why = _pick_precision(candidates, trial)
    compiled = want_compile == "on"
    if want_compile == "on":
        why.append("compiled (asked for)")
    elif want_compile == "off":
        why.append("eager (asked for)")
    else:
        compiled, reason = _pick_compile(precision, total_steps, trials, trial)
        why.append(reason)
    return Recipe(
        precision=precision, compile=compiled, reason="; ".join(why), trials=trials, measured=fresh
    )


def _pick_precision(
    candidates: list[Precision], trial: Callable[[Precision, bool], Trial | None]
) -> tuple[Precision, list[str]]:
    base = candidates[0]
    ref = trial(base, False)
    if ref is None:
        return base, [
            f"{base}: not measured for this shape here yet (runs of {PROBE_MIN_STEPS}+ steps "
            "measure it)"
        ]
    best, why = base, [f"{base} {ref.step_s * 1000:.0f} ms/step"]
    for other in candidates[1:]:
        t = trial(other, False)
        if t is None:
            continue
        speedup = ref.step_s / t.step_s if t.step_s > 0 else 0.0
        if speedup < BF16_MARGIN:
            why.append(f"{other} {speedup:.2f}x: not faster by {BF16_MARGIN:.2f}x")
        elif not _close(t.loss, ref.loss):
            why.append(f"{other} {speedup:.2f}x but its loss strays past {LOSS_TOLERANCE:.0%}")
        else:
            best = other
            why.append(f"{other} {speedup:.2f}x, loss within {LOSS_TOLERANCE:.0%}")
    return best, [f"{best}: " + ", ".join(why)]


def _pick_compile(
    precision: Precision,
    total_steps: int,
    trials: list[Trial],
    trial: Callable[[Precision, bool], Trial | None],
) -> tuple[bool, str]:
    eager = trial(precision, False)
    if eager is None:
        return False, "eager"
    seen = _find(trials, precision, True)
    cost = seen.compile_s if seen is not None else COMPILE_ASSUMED_S
    run_s = eager.step_s * total_steps
    if seen is None and run_s * COMPILE_PROBE_SHARE < cost:
        return False, f"eager: a ~{run_s:.0f} s run is too short to try compiling (~{cost:.0f} s)"
    compiled = trial(precision, True)
    if compiled is None:
        return False, "eager: compile not measured yet on this machine"
    saving = (eager.step_s - compiled.step_s) * total_steps
    figures = (
        f"compiled {compiled.step_s * 1000:.0f} vs {eager.step_s * 1000:.0f} ms/step, "
        f"compiling {compiled.compile_s:.0f} s"
    )
    if saving > compiled.compile_s:
        return True, f"compiled: saves ~{saving:.0f} s over {total_steps} steps ({figures})"
    return False, f"eager: compiling would not pay back over {total_steps} steps ({figures})"


# ------------------------------------------------------------------------------- the cache


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def machine_id(device: str, threads: int) -> str:
    """What makes timings comparable: the processor (or GPU), torch, and the threads used."""
    import torch

    chip = torch.cuda.get_device_name(0) if device.startswith("cuda") else cpu_model()
    return (
        f"{chip or platform.processor()} | torch {torch.__version__} | {device} | {threads} threads"
    )


def read_trials(cache_dir: Path | None, machine: str, shape: str) -> list[Trial]:
    if cache_dir is None:
        return []
    path = cache_dir / "recipes" / f"{_key(machine, shape)}.json"
    if not path.is_file():
        return []
    try:
        saved = read_json(path, ProbeFile, RECIPE_VERSION)
    except (OSError, ValueError):
        return []  # a damaged cache is measured again, never fatal
    return saved.trials if saved.machine == machine and saved.shape == shape else []


def write_trials(cache_dir: Path | None, machine: str, shape: str, trials: list[Trial]) -> None:
    if cache_dir is None:
        return
    folder = cache_dir / "recipes"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_key(machine, shape)}.json"
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(dumps(ProbeFile(machine=machine, shape=shape, trials=trials), indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- MFU


def flops_per_token(parameters: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's
    scores and weighted sum, 12 * layers * width * context (PaLM's appendix B)."""
    return 6.0 * parameters + 12.0 * n_layer * n_embd * seq_len


def peak_flops(
    device: str, precision: Precision, machine: str, cache_dir: Path | None = None
) -> float:
    """FLOP/s of a square GEMM in the precision, timed once per machine (cached)."""
    folder = cache_dir / "recipes" if cache_dir is not None else None
    path = folder / f"peak-{_key(machine)}.json" if folder is not None else None
    saved = PeakFile(machine=machine)
    if path is not None and path.is_file():
        try:
            saved = read_json(path, PeakFile, RECIPE_VERSION)
        except (OSError, ValueError):
            saved = PeakFile(machine=machine)
        if precision in saved.flops and saved.machine == machine:
            return saved.flops[precision]
    flops = _gemm_flops(device, precision)
    if folder is not None and path is not None:
        folder.mkdir(parents=True, exist_ok=True)
        saved.flops[precision] = flops
        tmp = folder / f".{path.name}.tmp-{os.getpid()}"
        tmp.write_text(dumps(saved, indent=1))
        os.replace(tmp, path)
    return flops


def _gemm_flops(device: str, precision: Precision, seconds: float = 0.3) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = 4096 if device.startswith("cuda") else 1024
    gen = torch.Generator().manual_seed(0)  # the run's global RNG is left alone
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        a @ b
    sync()
    times: list[float] = []
    spent = 0.0
    while spent < seconds or len(times) < 3:
        t0 = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return 2.0 * n**3 / min(times)


def mfu(tokens_per_s: float, per_token: float, peak: float) -> float | None:
    if peak <= 0 or per_token <= 0 or tokens_per_s <= 0:
        return None
    return tokens_per_s * per_token / peak


# ---------------------------------------------------------------------------- the machine


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """CPU feature flags (x86 "flags", arm "Features"); empty where /proc is not there."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Cores this process may run on, counting SMT siblings once: torch's threads beyond
    one per core compete for the same units and slow training down."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return max(1, len(cores))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
