"""structlog, configured once: JSON off a terminal, readable on one.

Every line logged while a run is bound (`run_id` in the context) is also appended to that
run's `logs.jsonl`, so the per-run log is real and complete.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from pathlib import Path

import structlog

_runs_dir: Path | None = None
_configured = False


def _write_run_log(
    logger: object, method: str, event_dict: MutableMapping[str, object]
) -> MutableMapping[str, object]:
    run_id = event_dict.get("run_id")
    # The runtime binds its service's runs dir into the context of every handler.
    bound = event_dict.pop("runs_dir", None)
    runs_dir = Path(bound) if isinstance(bound, str) else _runs_dir
    if runs_dir is not None and isinstance(run_id, str) and run_id:
        run_dir = runs_dir / run_id
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with (run_dir / "logs.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(dict(event_dict), default=str) + "\n")
        except OSError:
            pass  # a full disk must not take the actor down; stdout still has the line
    return event_dict


class _Stderr:
    """Whatever sys.stderr is at the time of writing (test runners swap it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(data_dir: Path | None = None, *, json_logs: bool | None = None) -> None:
    """Idempotent; a later call may set the data dir that per-run logs go to."""
    global _runs_dir, _configured
    if data_dir is not None:
        _runs_dir = data_dir / "runs"
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
