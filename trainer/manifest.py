"""Run manifest: what was trained, with what, on what, and how it went (manifest.json)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "sentencepiece")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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


def system_info() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_version"] = torch.version.cuda
        info["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
    return info


def git_commit(repo_dir: Path | None = None) -> str | None:
    """The commit of the code that ran (this package's checkout), None outside a git repo."""
    cwd = repo_dir or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


@dataclass
class RunManifest:
    status: str  # running | completed | cancelled | early_stopped
    config: dict[str, object]
    model: dict[str, object]
    tokenizer: dict[str, object]
    data: dict[str, object]
    seed: int
    device: str
    precision: str
    started_at: str
    ended_at: str | None = None
    elapsed_s: float | None = None
    steps: int = 0
    total_steps: int = 0
    tokens: int = 0
    tokens_per_s: float | None = None
    train_loss: float | None = None
    train_ppl: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    test_loss: float | None = None
    test_ppl: float | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    early_stopped: bool = False
    resumed_from_step: int | None = None
    libraries: dict[str, str | None] = field(default_factory=library_versions)
    system: dict[str, object] = field(default_factory=system_info)
    git_commit: str | None = field(default_factory=git_commit)
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def write_manifest(run_dir: Path, manifest: RunManifest) -> None:
    """Atomically (temp file + rename) write run_dir/manifest.json."""
    tmp = run_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    # allow_nan: an infinite/NaN loss is reported as is (Python's json reads it back).
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, allow_nan=True) + "\n")
    os.replace(tmp, run_dir / MANIFEST_NAME)


def read_manifest(run_dir: Path) -> dict[str, object]:
    raw = json.loads((run_dir / MANIFEST_NAME).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{run_dir / MANIFEST_NAME} is not a JSON object")
    return raw
