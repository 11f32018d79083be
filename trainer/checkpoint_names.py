"""How checkpoints are named and which one a run resumes from, without torch: the trainer
actor (which never loads torch) and the training child (trainer.checkpoint) share it."""

from __future__ import annotations

import re
from pathlib import Path

LATEST = "latest"  # a file naming the newest complete checkpoint
META = "trainer.json"  # written last: a checkpoint folder without it is incomplete
_NAME = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def name_step(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def complete_names(ckpt_dir: Path) -> list[str]:
    """The complete checkpoints in ckpt_dir, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [
        (step, p.name)
        for p in ckpt_dir.iterdir()
        if (step := name_step(p.name)) is not None and (p / META).is_file()
    ]
    return [name for _, name in sorted(found)]


def latest_name(ckpt_dir: Path) -> str | None:
    """The checkpoint a run here resumes from: the one `latest` names when it is complete,
    else the newest complete one."""
    try:
        name = (ckpt_dir / LATEST).read_text().strip()
    except OSError:
        name = ""
    if name and name_step(name) is not None and (ckpt_dir / name / META).is_file():
        return name
    names = complete_names(ckpt_dir)
    return names[-1] if names else None
