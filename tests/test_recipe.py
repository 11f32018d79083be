"""The recipe: precision and compile decided from measured trials (injected here), cached per
machine and shape, recorded where a user looks, and MFU's figures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import trainer.train
from tests.helpers_ml import char_tokenizer, small_corpus, tiny_config
from trainer.manifest import read_manifest
from trainer.recipe import (
    COMPILE_ASSUMED_S,
    PROBE_MIN_STEPS,
    Precision,
    Trial,
    decide,
    flops_per_token,
    mfu,
    physical_cores,
    read_trials,
    write_trials,
)
from trainer.report import Progress, StartInfo
from trainer.train import train


class Timings:
    """A probe that answers with given step times and records what it was asked."""

    def __init__(self, step_s: dict[tuple[Precision, bool], float], **loss: float) -> None:
        self.step_s = step_s
        self.loss = loss
        self.asked: list[tuple[Precision, bool]] = []

    def __call__(self, precision: Precision, compiled: bool) -> Trial:
        self.asked.append((precision, compiled))
        return Trial(
            precision=precision,
            compile=compiled,
            step_s=self.step_s[(precision, compiled)],
            loss=self.loss.get(precision, 5.0),
            compile_s=40.0 if compiled else 0.0,
        )


BOTH: list[Precision] = ["fp32", "bf16"]


@pytest.mark.parametrize(
    ("bf16_s", "chosen"),
    [
        (0.14, "fp32"),  # slower (the Xeon without AMX: 0.73x)
        (0.095, "fp32"),  # faster, but not by the margin
        (0.047, "bf16"),  # 2.1x (the Zen 4)
    ],
)
def test_precision_follows_the_measured_speed(bf16_s: float, chosen: Precision) -> None:
    probe = Timings({("fp32", False): 0.1, ("bf16", False): bf16_s})
    recipe = decide(BOTH, "off", 1000, [], probe)
    assert recipe.precision == chosen and not recipe.compile
    assert recipe.measured and sorted(probe.asked) == [("bf16", False), ("fp32", False)]
    assert recipe.reason.startswith(f"{chosen}: fp32 100 ms/step, bf16 ")


def test_bf16_whose_loss_strays_is_refused() -> None:
    probe = Timings({("fp32", False): 0.1, ("bf16", False): 0.04}, fp32=5.0, bf16=5.2)
    recipe = decide(BOTH, "off", 1000, [], probe)
    assert recipe.precision == "fp32" and "loss strays" in recipe.reason
    within = Timings({("fp32", False): 0.1, ("bf16", False): 0.04}, fp32=5.0, bf16=5.09)
    assert decide(BOTH, "off", 1000, [], within).precision == "bf16"


def test_a_run_that_may_not_probe_uses_the_cache_or_the_safe_default() -> None:
    recipe = decide(BOTH, "auto", 50, [], None)
    assert (recipe.precision, recipe.compile, recipe.measured) == ("fp32", False, False)
    assert recipe.reason == (
        f"fp32: not measured for this shape here yet (runs of {PROBE_MIN_STEPS}+ steps "
        "measure it); eager"
    )
    known = [
        Trial(precision="fp32", compile=False, step_s=0.1, loss=5.0),
        Trial(precision="bf16", compile=False, step_s=0.05, loss=5.0),
    ]
    recipe = decide(BOTH, "auto", 50, known, None)
    assert (recipe.precision, recipe.measured) == ("bf16", False)


def test_compile_only_when_it_pays_back() -> None:
    fast: dict[tuple[Precision, bool], float] = {("fp32", False): 0.1, ("fp32", True): 0.06}
    # 5,000 steps x 0.1 s: a compile that did not pay would cost over 3% of it: not tried.
    probe = Timings(fast)
    recipe = decide(["fp32"], "auto", 5000, [], probe)
    assert not recipe.compile and probe.asked == [("fp32", False)]
    assert f"too short to try compiling (~{COMPILE_ASSUMED_S:.0f} s)" in recipe.reason
    # 20,000 steps: tried; saves 0.04 s x 20,000 = 800 s against 40 s of compiling.
    probe = Timings(fast)
    recipe = decide(["fp32"], "auto", 20_000, [], probe)
    assert recipe.compile and probe.asked == [("fp32", False), ("fp32", True)]
    assert "compiled: saves ~800 s over 20000 steps" in recipe.reason
    # Saves 0.001 s x 20,000 = 20 s, less than the 40 s it costs.
    barely = Timings({("fp32", False): 0.1, ("fp32", True): 0.099})
    recipe = decide(["fp32"], "auto", 20_000, [], barely)
    assert not recipe.compile and "would not pay back" in recipe.reason
    # Once measured (cached), the compile time measured decides, even for a shorter run.
    recipe = decide(["fp32"], "auto", 5000, barely_known := list(recipe.trials), None)
    assert not recipe.compile and len(barely_known) == 2
    # Compiled but slower: never.
    slow = Timings({("fp32", False): 0.1, ("fp32", True): 0.12})
    assert not decide(["fp32"], "auto", 100_000, [], slow).compile


def test_asked_for_is_kept_without_measuring() -> None:
    probe = Timings({})
    recipe = decide(["bf16"], "on", 10, [], probe)
    assert (recipe.precision, recipe.compile, probe.asked) == ("bf16", True, [])
    assert recipe.reason == "bf16 (asked for); compiled (asked for)"


def test_trials_are_cached_per_machine_and_shape(tmp_path: Path) -> None:
    trials = [Trial(precision="fp32", compile=False, step_s=0.1, loss=5.0)]
    write_trials(tmp_path, "cpu A", "shape 1", trials)
    assert read_trials(tmp_path, "cpu A", "shape 1") == trials
    assert read_trials(tmp_path, "cpu B", "shape 1") == []
    assert read_trials(tmp_path, "cpu A", "shape 2") == []
    assert read_trials(None, "cpu A", "shape 1") == []
    for f in (tmp_path / "recipes").iterdir():
        f.write_text("{not json")  # a damaged cache is measured again, never fatal
    assert read_trials(tmp_path, "cpu A", "shape 1") == []


def test_mfu_figures() -> None:
    # nanoGPT's 124M model at 1024 tokens: 6N + 12 L d T.
    assert flops_per_token(124_000_000, 12, 768, 1024) == 6 * 124e6 + 12 * 12 * 768 * 1024
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, 0.0) is None
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))  # SMT siblings once


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    corpus = small_corpus(root / "corpus")
    return corpus, char_tokenizer(corpus, root / "tok")


def test_a_run_probes_records_and_reuses_its_recipe(
    data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe really runs (fp32 and bf16, a few steps each), the run uses what it chose,
    the manifest and the start report say why, and the next run of the shape reads the
    cache instead of probing again."""
    corpus, tok_dir = data
    monkeypatch.setattr(trainer.train, "PROBE_MIN_STEPS", 1)  # probe even a short run
    cfg = tiny_config("gpt2", precision="auto", max_steps=4)
    starts: list[StartInfo] = []
    progress: list[Progress] = []
    cache = tmp_path / "cache"
    result = train(
        cfg,
        corpus,
        tok_dir,
        tmp_path / "a",
        on_start=starts.append,
        on_progress=progress.append,
        cache_dir=cache,
    )
    first = read_manifest(tmp_path / "a")
    assert first.recipe is not None and first.recipe.measured
    assert sorted((t.precision, t.compile) for t in first.recipe.trials) == [
        ("bf16", False),
        ("fp32", False),
    ]
    assert all(t.step_s > 0 and t.loss is not None for t in first.recipe.trials)
    assert first.precision == first.recipe.precision
    assert starts[0].precision == first.precision and starts[0].recipe == first.recipe.reason
    assert starts[0].threads == 1 and starts[0].peak_flops > 0
    assert starts[0].flops_per_token > 6 * starts[0].parameters  # plus attention
    assert result.mfu is not None and 0 < result.mfu < 1
    assert all(p.mfu is not None and p.mfu > 0 for p in progress)
    assert first.mfu == result.mfu and first.peak_flops == starts[0].peak_flops

    train(cfg, corpus, tok_dir, tmp_path / "b", cache_dir=cache)
    second = read_manifest(tmp_path / "b")
    assert second.recipe is not None and not second.recipe.measured
    assert second.recipe.trials == first.recipe.trials
    assert second.precision == first.precision


def test_the_cache_decides_a_short_run(data: tuple[Path, Path], tmp_path: Path) -> None:
    """What was measured on this machine for this shape decides, as injected timings: bf16
    measured 2x faster makes a run bf16, measured slower keeps it fp32."""
    corpus, tok_dir = data
    cfg = tiny_config("gpt2", precision="auto", max_steps=2)
    for bf16_s, expected in ((0.05, "bf16"), (0.2, "fp32")):
        cache = tmp_path / f"cache-{expected}"
        measured: list[Trial] = [
            Trial(precision="fp32", compile=False, step_s=0.1, loss=5.0),
            Trial(precision="bf16", compile=False, step_s=bf16_s, loss=5.0),
        ]
        # The cache's key is the run's own: a first run names it; then the trials are set.
        train(cfg, corpus, tok_dir, tmp_path / f"w-{expected}", cache_dir=cache)
        assert not (cache / "recipes").exists() or not list((cache / "recipes").glob("[!p]*"))
        named = read_manifest(tmp_path / f"w-{expected}").recipe
        assert named is not None and named.machine and named.shape
        write_trials(cache, named.machine, named.shape, measured)
        train(cfg, corpus, tok_dir, tmp_path / f"r-{expected}", cache_dir=cache)
        manifest = read_manifest(tmp_path / f"r-{expected}")
        assert manifest.precision == expected
        assert manifest.recipe is not None and not manifest.recipe.measured
