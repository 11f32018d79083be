"""A run's metrics in the tools people already look at runs with.

TensorBoard, always: event files in <run_dir>/tb/, written by torch's SummaryWriter, so
`tensorboard --logdir <data dir>/runs` shows every run: train loss, learning rate, grad
norm, tokens/s and MFU (where known) each step, the validation loss and the samples (as
text) at each validation, the test loss at the end. A resumed run opens its writer with
purge_step = the checkpoint's step + 1: TensorBoard then drops what the run logged past its
checkpoint before it stopped, since those steps are done again.

MLflow, when MLFLOW_TRACKING_URI is set (imported only then: it takes seconds): one MLflow
run per run (named after the run dir, in the experiment MLFLOW_EXPERIMENT_NAME, default
"model-trainer"), with the config as params and the same metrics. Metrics are sent in
batches when a checkpoint is due and at the end, so a run resumed from its checkpoint sends
each step once (MLflow cannot take points back); tracking.json keeps the MLflow run id, so
a resumed run goes on in the same MLflow run. A tracking server that fails is logged and
left alone for the rest of the run: it never fails a training.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import msgspec
import structlog

from protocol.events import Sample
from trainer.config import TrainConfig
from trainer.jsonfile import dumps, read_json
from trainer.report import Progress, Status

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from torch.utils.tensorboard import SummaryWriter

TB_DIR = "tb"
TRACKING_NAME = "tracking.json"
TRACKING_VERSION = 1
DEFAULT_EXPERIMENT = "model-trainer"
TB_FLUSH_S = 10  # how far TensorBoard may lag behind the run
MLFLOW_BATCH = 1000  # the most metrics MLflow takes in one log_batch
_STATUS: dict[Status, str] = {
    "completed": "FINISHED",
    "early_stopped": "FINISHED",
    "cancelled": "KILLED",  # stopped on request (or to be resumed)
}

log = structlog.get_logger("trainer.tracking")


class TrackingRecord(msgspec.Struct, kw_only=True):
    """tracking.json: where a run's metrics go besides TensorBoard."""

    version: int = TRACKING_VERSION
    mlflow_run_id: str = ""


def read_record(run_dir: Path) -> TrackingRecord:
    """The run's tracking.json (an empty record when there is none)."""
    path = run_dir / TRACKING_NAME
    return read_json(path, TrackingRecord, TRACKING_VERSION) if path.is_file() else TrackingRecord()


def samples_markdown(samples: list[Sample]) -> str:
    """Samples as TensorBoard text (markdown): one preformatted block each, prompt first."""
    blocks = []
    for s in samples:
        lines = (s.prompt + s.text).split("\n")
        blocks.append("\n".join("    " + line for line in lines))
    return "\n\n".join(blocks)


class Tracker:
    """Writes a run's progress to TensorBoard (and MLflow); a context manager."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, resumed_from: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.cfg = cfg
        tb = run_dir / TB_DIR
        if resumed_from is None:
            shutil.rmtree(tb, ignore_errors=True)  # a start over: its steps are all redone
        else:
            _after_event_files(tb)
        self.tb: SummaryWriter = SummaryWriter(
            str(tb),
            purge_step=None if resumed_from is None else resumed_from + 1,
            flush_secs=TB_FLUSH_S,
        )
        self.mlflow = Mlflow.open(run_dir, cfg) if os.environ.get("MLFLOW_TRACKING_URI") else None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.mlflow is not None:
            self.mlflow.end("FAILED" if exc is not None else None)
        self.tb.close()

    def log(self, p: Progress) -> None:
        """One step's progress (and its validation and samples, when it ran one)."""
        scalars = {
            "train/loss": p.loss,
            "train/lr": p.lr,
            "train/grad_norm": p.grad_norm,
            "train/tokens_per_s": p.tokens_per_s,
        }
        if p.mfu is not None:
            scalars["train/mfu"] = p.mfu
        if p.val_loss is not None:
            scalars["val/loss"] = p.val_loss
        for name, value in scalars.items():
            self.tb.add_scalar(name, value, p.step)
        if p.samples:
            self.tb.add_text("samples", samples_markdown(p.samples), p.step)
        if self.mlflow is not None:
            self.mlflow.add(scalars, p.step)
            if p.step % self.cfg.checkpoint_every == 0:  # its checkpoint comes next
                self.mlflow.flush()

    def finish(self, status: Status, step: int, test_loss: float | None) -> None:
        """The run's end: its test loss, and its status for MLflow."""
        if test_loss is not None:
            self.tb.add_scalar("test/loss", test_loss, step)
        if self.mlflow is not None:
            if test_loss is not None:
                self.mlflow.add({"test/loss": test_loss}, step)
            self.mlflow.end(_STATUS[status])


def _after_event_files(tb: Path) -> None:
    """Wait, if need be, until a new event file's name sorts after the existing ones.

    TensorBoard reads a folder's event files in name order, and a name starts with the
    second it was created in: a writer opened in the same second as the last one (a quick
    resume) could be read first, and its purge would then drop nothing.
    """
    seconds = [
        int(parts[3])
        for p in (tb.iterdir() if tb.is_dir() else [])
        if len(parts := p.name.split(".")) > 3 and parts[3].isdigit()
    ]
    if seconds and (wait := max(seconds) + 1 - time.time()) > 0:
        time.sleep(wait)


class Mlflow:
    """One MLflow run: the run's metrics in batches, its config as params."""

    def __init__(self, client: MlflowClient, run_id: str, run_dir: Path) -> None:
        self.client = client
        self.run_id = run_id
        self.run_dir = run_dir
        self.pending: list[tuple[str, float, int, int]] = []  # (name, value, ms, step)
        self.failed = False

    @classmethod
    def open(cls, run_dir: Path, cfg: TrainConfig) -> Mlflow | None:
        from mlflow.tracking import MlflowClient

        path = run_dir / TRACKING_NAME
        record = read_record(run_dir)
        try:
            client = MlflowClient()  # MLFLOW_TRACKING_URI, and the rest of MLflow's variables
            run_id = _resume(client, record.mlflow_run_id) or _create(client, run_dir, cfg)
        except Exception as e:  # a tracking server that fails must not fail the training
            _warn(run_dir, "MLflow is off for this run: it could not be reached", e)
            return None
        if run_id != record.mlflow_run_id:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(dumps(TrackingRecord(mlflow_run_id=run_id)))
            os.replace(tmp, path)
        return cls(client, run_id, run_dir)

    def add(self, metrics: dict[str, float], step: int) -> None:
        ms = int(time.time() * 1000)
        self.pending.extend((name, value, ms, step) for name, value in metrics.items())

    def flush(self) -> None:
        from mlflow.entities import Metric

        batch, self.pending = self.pending, []
        if self.failed:
            return
        try:
            for i in range(0, len(batch), MLFLOW_BATCH):
                metrics = [
                    Metric(key=k, value=v, timestamp=ms, step=s)
                    for k, v, ms, s in batch[i : i + MLFLOW_BATCH]
                ]
                self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:  # a tracking server that fails must not fail the training
            self._fail(e)

    def end(self, status: str | None) -> None:
        """Send what is pending; mark the MLflow run ended with status (None: already)."""
        self.flush()
        if status is None or self.failed:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:  # a tracking server that fails must not fail the training
            self._fail(e)
        self.failed = True  # ended: nothing more is sent

    def _fail(self, e: Exception) -> None:
        self.failed = True
        _warn(self.run_dir, "MLflow is off for the rest of this run: sending failed", e)


def _resume(client: MlflowClient, run_id: str) -> str:
    """The MLflow run of an earlier attempt, set running again ("" when there is none)."""
    if not run_id:
        return ""
    from mlflow.exceptions import MlflowException

    try:
        client.update_run(run_id, status="RUNNING")
    except MlflowException:
        return ""  # another tracking server, or the run was deleted: start a new one
    return run_id


def _create(client: MlflowClient, run_dir: Path, cfg: TrainConfig) -> str:
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        try:
            experiment_id = client.create_experiment(name)
        except MlflowException:  # created meanwhile by a run beside this one
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            experiment_id = found.experiment_id
    run = client.create_run(experiment_id, run_name=run_dir.name)
    values = msgspec.to_builtins(cfg)
    params = [Param(key, str(values[key])) for key in sorted(values)]
    client.log_batch(run.info.run_id, params=params)
    return str(run.info.run_id)


def _warn(run_dir: Path, message: str, e: Exception) -> None:
    log.warning(message, run_id=run_dir.name, error=f"{type(e).__name__}: {e}")
