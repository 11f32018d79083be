"""A run's metrics in TensorBoard (read back with TensorBoard's own reader) and MLflow (read
back with MLflow's client, from a file store): every scalar at every step, the samples as
text at each validation, and a run resumed after a crash shows each step once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import (
    SCALARS,
    TENSORS,
    EventAccumulator,
)

from protocol.events import Sample
from tests.helpers_ml import char_tokenizer, small_corpus, tiny_config
from trainer.report import Progress, TrainResult
from trainer.tracking import TB_DIR, TRACKING_NAME, read_record, samples_markdown
from trainer.train import train

# Dropout on: a sampler that drew from the global RNG would change the losses.
CHANGES: dict[str, object] = {
    "max_steps": 6,
    "eval_every": 3,
    "checkpoint_every": 3,
    "dropout": 0.1,
    "sample_count": 2,
    "sample_tokens": 8,
}
EVERY_STEP = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu")


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    corpus = small_corpus(root / "corpus", repeat=1)
    return corpus, char_tokenizer(corpus, root / "tok")


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow 3 keeps its file store only on request (it points to a database instead).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-test")
    return uri


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / TB_DIR), size_guidance={SCALARS: 0, TENSORS: 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def texts(acc: EventAccumulator) -> list[tuple[int, str]]:
    return [
        (e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors("samples/text_summary")
    ]


def logged_samples(run_dir: Path) -> list[tuple[int, list[Sample]]]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "samples":
            out.append((record["step"], [Sample(**s) for s in record["samples"]]))
    return out


def same_points(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    """The same steps, and the same values as float32 (TensorBoard's scalars) keeps them."""
    return [s for s, _ in a] == [s for s, _ in b] and [v for _, v in a] == pytest.approx(
        [v for _, v in b], rel=1e-6
    )


def mlflow_run_id(run_dir: Path) -> str:
    return read_record(run_dir).mlflow_run_id


def check_tensorboard(run_dir: Path, result: TrainResult) -> None:
    """Every scalar once at every step it was logged at, with the run's values."""
    acc = events(run_dir)
    assert set(EVERY_STEP) | {"val/loss", "test/loss"} == set(acc.Tags()["scalars"])
    for tag in EVERY_STEP:
        assert [s for s, _ in scalars(acc, tag)] == [1, 2, 3, 4, 5, 6], tag
    assert [v for _, v in scalars(acc, "train/loss")] == pytest.approx(result.losses, rel=1e-6)
    assert same_points(scalars(acc, "val/loss"), result.val_history)
    assert result.test_loss is not None
    assert same_points(scalars(acc, "test/loss"), [(6, result.test_loss)])
    logged = logged_samples(run_dir)
    assert [step for step, _ in logged] == [3, 6]
    assert texts(acc) == [(step, samples_markdown(s)) for step, s in logged]


def test_tensorboard_and_mlflow_hold_every_metric_and_a_resume_shows_each_step_once(
    data: tuple[Path, Path], tmp_path: Path, mlflow_uri: str
) -> None:
    corpus, tok = data
    cache = tmp_path / "cache"  # the peak FLOP/s, measured once: MFU is known
    clean = train(tiny_config("gpt2", **CHANGES), corpus, tok, tmp_path / "clean", cache_dir=cache)
    check_tensorboard(tmp_path / "clean", clean)
    samples = logged_samples(tmp_path / "clean")
    assert all(len(s) == 2 and all(x.text for x in s) for _, s in samples)

    client = MlflowClient(mlflow_uri)
    run = client.get_run(mlflow_run_id(tmp_path / "clean"))
    assert run.info.status == "FINISHED" and run.info.run_name == "clean"
    assert run.data.params["model_family"] == "gpt2" and run.data.params["max_steps"] == "6"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == list(enumerate(clean.losses, 1))
    for tag in EVERY_STEP:
        assert [m.step for m in client.get_metric_history(run.info.run_id, tag)] == [*range(1, 7)]
    val = client.get_metric_history(run.info.run_id, "val/loss")
    assert [(m.step, m.value) for m in val] == clean.val_history
    [test] = client.get_metric_history(run.info.run_id, "test/loss")
    assert (test.step, test.value) == (6, clean.test_loss)

    # A crash after step 4 (checkpoint at 3): TensorBoard and MLflow have step 4 already.
    crashed = tmp_path / "crashed"

    def crash_at_4(p: Progress) -> None:
        if p.step == 4:
            raise Crash

    with pytest.raises(Crash):
        train(
            tiny_config("gpt2", **CHANGES),
            corpus,
            tok,
            crashed,
            on_progress=crash_at_4,
            cache_dir=cache,
        )
    first_mlflow_run = mlflow_run_id(crashed)
    assert client.get_run(first_mlflow_run).info.status == "FAILED"
    assert [s for s, _ in scalars(events(crashed), "train/loss")] == [1, 2, 3, 4]

    resumed = train(tiny_config("gpt2", **CHANGES), corpus, tok, crashed, cache_dir=cache)
    assert resumed.resumed_from_step == 3 and resumed.losses == clean.losses
    check_tensorboard(crashed, resumed)  # step 4 once: the resumed writer purged the old one
    assert logged_samples(crashed) == samples  # seeded: the same run writes the same samples

    assert mlflow_run_id(crashed) == first_mlflow_run  # the resumed run goes on in its MLflow run
    run = client.get_run(first_mlflow_run)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(first_mlflow_run, "train/loss")
    # Step 4 was sent when the crash ended the first attempt; exact resume redid it the same.
    assert {(m.step, m.value) for m in history} == set(enumerate(clean.losses, 1))


def test_without_samples_the_run_trains_the_same_and_writes_none(
    data: tuple[Path, Path], tmp_path: Path
) -> None:
    corpus, tok = data
    cache = tmp_path / "cache"
    on = train(tiny_config("gpt2", **CHANGES), corpus, tok, tmp_path / "on", cache_dir=cache)
    off_cfg = tiny_config("gpt2", **{**CHANGES, "sample_count": 0})
    off = train(off_cfg, corpus, tok, tmp_path / "off", cache_dir=cache)
    # Sampling never draws from the global RNG: with dropout on, the losses stay bit for bit.
    assert off.losses == on.losses and off.val_history == on.val_history
    assert logged_samples(tmp_path / "off") == []
    assert "samples/text_summary" not in events(tmp_path / "off").Tags()["tensors"]
    assert not (tmp_path / "off" / TRACKING_NAME).exists()  # no MLFLOW_TRACKING_URI: no MLflow
