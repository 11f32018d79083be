"""Run manifest: what was trained, with what, on what, and how it went (manifest.json)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import msgspec

from trainer.jsonfile import dumps, read_json
from trainer.recipe import Recipe, cpu_model

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "numpy",
    "sentencepiece",
    "peft",
)


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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


class TokenizerRef(msgspec.Struct, kw_only=True):
    dir: str
    vocab_size: int
    sha256: str  # over the tokenizer dir's files


class DataRef(msgspec.Struct, kw_only=True):
    dir: str  # the prepared corpus
    tokens: dict[str, int]  # per split
    fingerprint: str  # corpus + tokenizer (TokenDataInfo.fingerprint)


class RunManifest(msgspec.Struct, kw_only=True):
    """manifest.json. The uploader adds the artifact pointer under "artifact" (not read here)."""

    version: int = MANIFEST_VERSION
    status: str  # running | completed | cancelled | early_stopped
    config: dict[str, object]  # the training config
    model: dict[str, object]  # the ModelConfig + parameter counts
    tokenizer: TokenizerRef
    data: DataRef
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
    compile: bool = False
    recipe: Recipe | None = None  # the precision and compile chosen, why, and the figures
    threads: int = 0  # of each process
    world_size: int = 1  # DDP processes (trainer.distributed)
    backend: str = ""  # gloo / nccl; "" for one process
    flops_per_token: float = 0.0
    peak_flops: float = 0.0  # measured GEMM FLOP/s in the run's precision
    mfu: float | None = None  # model FLOPs utilisation over the run
    libraries: dict[str, str | None] = msgspec.field(default_factory=library_versions)
    system: dict[str, object] = msgspec.field(default_factory=system_info)
    git_commit: str | None = msgspec.field(default_factory=git_commit)


def write_manifest(run_dir: Path, manifest: RunManifest) -> None:
    """Atomically (temp file + rename) write run_dir/manifest.json."""
    tmp = run_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(dumps(manifest))  # an infinite/NaN loss is written as is (see jsonfile)
    os.replace(tmp, run_dir / MANIFEST_NAME)


def read_manifest(run_dir: Path) -> RunManifest:
    return read_json(run_dir / MANIFEST_NAME, RunManifest, MANIFEST_VERSION)
