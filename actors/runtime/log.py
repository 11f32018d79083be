"""structlog, configured once: JSON off a terminal, readable on one.

Every line logged while a runtime handles a run's command (`run_id` in the event) goes to
that run's log: to the runtime's run log sink (`bind_run_log`; it writes the run's Redis
stream, see actors.runtime.runlog), and to `<runs dir>/<run_id>/logs.jsonl` when the
runtime has a runs dir (the file is kept in the run folder that gets archived). Lines of
other processes that name a run (the control endpoint's "run submitted") stay in their
process's output: a control endpoint writes no run folder.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Callable, MutableMapping
from pathlib import Path

import msgspec
import structlog

_configured = False

RunLineSink = Callable[[str, bytes], None]  # (run_id, one JSON line); never blocks
_sink: contextvars.ContextVar[RunLineSink | None] = contextvars.ContextVar(
    "mt_run_log_sink", default=None
)


def bind_run_log(sink: RunLineSink | None) -> None:
    """Lines with a run_id logged in this context (and the tasks and threads it starts) go
    to `sink` as well."""
    _sink.set(sink)


def _write_run_log(
    logger: object, method: str, event_dict: MutableMapping[str, object]
) -> MutableMapping[str, object]:
    run_id = event_dict.get("run_id")
    # The runtime binds its service's runs dir into the context of every handler.
    bound = event_dict.pop("runs_dir", None)
    runs_dir = Path(bound) if isinstance(bound, str) else None
    sink = _sink.get()
    if not isinstance(run_id, str) or not run_id or (runs_dir is None and sink is None):
        return event_dict
    line = msgspec.json.encode(dict(event_dict), enc_hook=str)
    if sink is not None:
        sink(run_id, line)
    if runs_dir is not None:
        run_dir = runs_dir / run_id
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with (run_dir / "logs.jsonl").open("ab") as f:
                f.write(line + b"\n")
        except OSError:
            pass  # a full disk must not take the actor down; stdout still has the line
    return event_dict


class _Stderr:
    """Whatever sys.stderr is at the time of writing (test runners swap it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(*, json_logs: bool | None = None) -> None:
    """Idempotent."""
    global _configured
    if _configured:
        return
    _configured = True
    as_json = (not sys.stderr.isatty()) if json_logs is None else json_logs
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _write_run_log,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]  # structlog wants a TextIO; write/flush is all it uses
        cache_logger_on_first_use=True,
    )


def get(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]  # structlog returns Any
