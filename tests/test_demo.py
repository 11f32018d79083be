"""`./scripts/demo` is the main job: its quick configuration runs green from a fresh data dir,
with no REDIS_URL (so on the embedded server), and prints the summary it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(900)
def test_the_quick_demo_runs_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("MT_")}
    env.update(MT_DATA_DIR=str(tmp_path / "data"), MT_HTTP_PORT="0")
    done = subprocess.run(
        [sys.executable, "-m", "actors.cli.main", "demo", "--quick"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    for expected in (
        "dashboard",
        "run completed",
        "== summary",
        "tokenizer   bpe",
        "validation  perplexity",
        "test        perplexity",
        "samples",
        "AutoModelForCausalLM.from_pretrained",
    ):
        assert expected in out, (expected, out[-3000:])
    runs = list((tmp_path / "data" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "model.safetensors").is_file()
    assert any((tmp_path / "data" / "artifacts" / "run").glob("*.tar.gz"))
    assert (tmp_path / "data" / "redis" / "appendonlydir").is_dir()
