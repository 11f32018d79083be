"""`python -m trainer`: the whole path from a text file to generated text, and its errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers_ml import TEXT
from trainer.__main__ import main

REPO = Path(__file__).resolve().parents[1]
TINY_LSTM = [
    "--family",
    "char_lstm",
    "--override",
    "n_layer=1",
    "--override",
    "n_embd=16",
    "--override",
    "hidden=32",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--threads",
    "1",
]


def cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "trainer", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """corpus -> char tokenizer, through the CLI."""
    work = tmp_path_factory.mktemp("cli")
    (work / "book.txt").write_text(TEXT * 3)
    out = ok(cli("corpus", "book.txt", "--out", "corpus", cwd=work))
    assert "train" in out and "validation" in out
    out = ok(
        cli(
            "tokenizer",
            "--corpus",
            "corpus",
            "--out",
            "tok",
            "--kind",
            "char",
            "--min-frequency",
            "1",
            cwd=work,
        )
    )
    assert "vocab size" in out
    assert (work / "tok" / "mt_tokenizer.json").is_file()
    return work


def test_cli_end_to_end(prepared: Path) -> None:
    work = prepared
    out = ok(
        cli(
            "train",
            "--corpus",
            "corpus",
            "--tokenizer",
            "tok",
            "--out",
            "run",
            *TINY_LSTM,
            "--max-steps",
            "6",
            "--eval-every",
            "3",
            "--log-every",
            "2",
            cwd=work,
        )
    )
    assert "step      2/6" in out and "val " in out
    # The samples of each validation (steps 3 and 6), under its line, the prompts quoted.
    shown = [line for line in out.splitlines() if line.startswith("    sample: ")]
    logged = [json.loads(r) for r in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    prompts = [s["prompt"] for r in logged if r["kind"] == "samples" for s in r["samples"]]
    assert len(shown) == len(prompts) == 4
    assert all(
        line.startswith(f"    sample: {json.dumps(p, ensure_ascii=False)} → ")
        for line, p in zip(shown, prompts, strict=True)
    )
    assert "completed: 6/6 steps" in out
    assert (work / "run" / "model.safetensors").is_file()

    out = ok(cli("evaluate", "run", "--split", "test", cwd=work))
    assert "perplexity" in out
    metrics = json.loads((work / "run" / "eval" / "metrics.json").read_text())
    assert metrics["source"] == "test" and metrics["loss"] > 0
    assert (work / "run" / "eval" / "samples.jsonl").is_file()

    gen = ("generate", "run", "The", "--seed", "3", "--max-new-tokens", "12", "-n", "2", "--json")
    texts = json.loads(ok(cli(*gen, cwd=work)))
    assert isinstance(texts, list) and len(texts) == 2
    assert json.loads(ok(cli(*gen, cwd=work))) == texts  # same seed, same text
    plain = ok(
        cli("generate", "run", "The", "--temperature", "0", "--max-new-tokens", "5", cwd=work)
    )
    assert plain.startswith("The")

    scored = json.loads(ok(cli("score", "run", "The mill", "--json", cwd=work)))
    assert scored["num_tokens"] == 8 and len(scored["chars"]) == 8
    assert "bits/char" in ok(cli("score", "run", "The mill", "--detail", cwd=work))


def test_cli_ctrl_c_stops_training_with_a_checkpoint(prepared: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainer",
            "train",
            "--corpus",
            "corpus",
            "--tokenizer",
            "tok",
            "--out",
            "stopped",
            *TINY_LSTM,
            "--max-steps",
            "100000",
            "--log-every",
            "1",
        ],
        cwd=prepared,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("step"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopping after this step" in err
    assert "cancelled:" in out
    assert (prepared / "stopped" / "checkpoints" / "latest").is_file()


def test_cli_user_error_exits_2_without_a_traceback(tmp_path: Path) -> None:
    p = cli("corpus", "missing.txt", "--out", "corpus", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and "does not exist" in p.stderr
    assert "Traceback" not in p.stderr


def test_cli_errors_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no trained model" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--corpus",
                str(tmp_path),
                "--tokenizer",
                str(tmp_path),
                "--out",
                str(tmp_path / "run"),
                "--override",
                "n_layer",
            ]
        )
        == 2
    )
    assert "NAME=INTEGER" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--corpus",
                str(tmp_path),
                "--tokenizer",
                str(tmp_path),
                "--out",
                str(tmp_path / "run"),
                "--batch-size",
                "0",
            ]
        )
        == 2
    )
    assert "batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: usage error
        main(["generate"])
    assert exc.value.code == 2


def test_cli_trains_on_two_processes(prepared: Path) -> None:
    """--nproc-per-node 2: DDP through the elastic launcher; rank 0 alone prints."""
    args = [*TINY_LSTM[:-1], "2"]  # --threads 2: the machine's, one per process
    out = ok(
        cli(
            *["train", "--corpus", "corpus", "--tokenizer", "tok", "--out", "ddp", *args],
            *["--nproc-per-node", "2", "--max-steps", "4", "--log-every", "1"],
            cwd=prepared,
        )
    )
    assert "2 processes (gloo) x 1 threads" in out
    assert out.count("step      4/4") == 1 and "completed: 4/4 steps" in out
    manifest = json.loads((prepared / "ddp" / "manifest.json").read_text())
    assert (manifest["world_size"], manifest["threads"]) == (2, 1)


def test_cli_refuses_a_batch_the_processes_cannot_share(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--corpus", str(tmp_path), "--tokenizer", str(tmp_path)]
    argv += ["--out", str(tmp_path / "run"), "--nnodes", "2", "--batch-size", "3"]
    assert main(argv) == 2
    assert "batch_size 3 must be a multiple of the world size 2" in capsys.readouterr().err
