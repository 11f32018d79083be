"""Settings from the environment; every variable has a default that works on one machine."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = None
    data_dir: Path = Path(".model-trainer")
    corpus_root: Path = Path(".model-trainer/corpus")
    prefix: str = "mt"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    api_key: str | None = None
    data_bank_url: str | None = None
    data_bank_key: str | None = None
    discord_token: str | None = None
    discord_api: str = "https://discord.com/api/v10"
    events_channel: str = "trainer:events"
    consumer: str | None = None  # base consumer name; default host-actor-index
    lease_s: float = 30.0  # a pending command idle this long is taken over by another consumer
    max_streams: int = 100  # live SSE streams of the control endpoint (each holds a connection)
    http_timeout_s: float = 15.0  # to send a request's headers, then its body; idle keep-alive
    # The artifact store (actors.runtime.store.make_store): unset → a folder in the data dir;
    # `s3://bucket/prefix` with the standard AWS_* variables; `databank:` → the Data Bank.
    store_url: str | None = None
    aws_endpoint_url: str | None = None  # an S3-compatible service other than AWS itself
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_region: str | None = None
    cache_gb: float = 20.0  # size limit of the local cache of what is in the store
    # The address other machines reach this one at: a run on several machines (nnodes > 1)
    # whose model.train this trainer takes opens its rendezvous there.
    advertise_host: str = "127.0.0.1"
    # How long a run on several machines waits for all its nodes to (re)join its rendezvous,
    # at the start and after a node died, before it fails: a lost node never hangs a run.
    rendezvous_timeout_s: int = 120

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = dict(os.environ) if env is None else env
        data_dir = Path(e.get("MT_DATA_DIR") or ".model-trainer").absolute()
        return cls(
            redis_url=e.get("REDIS_URL") or None,
            data_dir=data_dir,
            corpus_root=Path(e.get("MT_CORPUS_ROOT") or data_dir / "corpus").absolute(),
            prefix=e.get("MT_PREFIX") or "mt",
            http_host=e.get("MT_HTTP_HOST") or "127.0.0.1",
            http_port=int(e.get("MT_HTTP_PORT") or 8000),
            api_key=e.get("MT_API_KEY") or None,
            data_bank_url=e.get("MT_DATA_BANK_URL") or None,
            data_bank_key=e.get("MT_DATA_BANK_KEY") or None,
            discord_token=e.get("MT_DISCORD_TOKEN") or None,
            discord_api=e.get("MT_DISCORD_API") or "https://discord.com/api/v10",
            events_channel=e.get("MT_EVENTS_CHANNEL") or "trainer:events",
            consumer=e.get("MT_CONSUMER") or None,
            lease_s=float(e.get("MT_LEASE_S") or 30.0),
            max_streams=int(e.get("MT_MAX_STREAMS") or 100),
            http_timeout_s=float(e.get("MT_HTTP_TIMEOUT_S") or 15.0),
            store_url=e.get("MT_STORE_URL") or None,
            aws_endpoint_url=e.get("AWS_ENDPOINT_URL") or None,
            aws_access_key_id=e.get("AWS_ACCESS_KEY_ID") or None,
            aws_secret_access_key=e.get("AWS_SECRET_ACCESS_KEY") or None,
            aws_region=e.get("AWS_REGION") or e.get("AWS_DEFAULT_REGION") or None,
            cache_gb=float(e.get("MT_CACHE_GB") or 20.0),
            advertise_host=e.get("MT_ADVERTISE_HOST") or "127.0.0.1",
            rendezvous_timeout_s=int(e.get("MT_RENDEZVOUS_TIMEOUT_S") or 120),
        )

    def consumer_name(self, actor: str, index: int = 0) -> str:
        """Stable across restarts, so a restarted actor reads its own pending entries first."""
        base = self.consumer or socket.gethostname()
        return f"{base}-{actor}-{index}"

    # Layout of the data dir, one place.
    def run_dir(self, run_id: str) -> Path:
        return self.data_dir / "runs" / run_id

    def corpus_dir(self, corpus_id: str) -> Path:
        return self.data_dir / "corpora" / corpus_id

    def tokenizer_dir(self, tokenizer_id: str) -> Path:
        return self.data_dir / "tokenizers" / tokenizer_id

    def artifact_dir(self) -> Path:
        return self.data_dir / "artifacts"

    def cancel_dir(self) -> Path:
        return self.data_dir / "cancel"

    def store_dir(self) -> Path:
        """The local artifact store (when MT_STORE_URL is unset)."""
        return self.data_dir / "store"
