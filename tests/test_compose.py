"""No Docker engine here: check that compose.yaml parses and wires every actor, each with a
data dir of its own, all sharing only Redis and the S3 store."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import msgspec
import yaml

from protocol.keys import ACTOR_NAMES

ROOT = Path(__file__).resolve().parent.parent
STORE_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")


class Service(msgspec.Struct):
    image: str = ""
    build: str = ""
    command: list[str] | str = []
    entrypoint: list[str] | str = []
    environment: dict[str, str] = {}
    volumes: list[str] = []
    depends_on: dict[str, dict[str, str]] = {}


class Compose(msgspec.Struct):
    services: dict[str, Service]


def load() -> dict[str, Service]:
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return msgspec.convert(doc, Compose).services


def test_compose_runs_redis_every_actor_and_control_from_one_image() -> None:
    services = load()
    assert set(services) == {"redis", "s3", "s3-bucket", "control", *ACTOR_NAMES}
    assert "--appendonly" in services["redis"].command
    for name in ACTOR_NAMES:
        svc = services[name]
        assert svc.command == ["model-trainer", "actor", name]
        assert svc.environment["REDIS_URL"].startswith("redis://redis:")
    images = {services[n].image for n in (*ACTOR_NAMES, "control")}
    assert len(images) == 1
    assert services["control"].command[:2] == ["model-trainer", "control"]
    assert services["trainer"].build == "."
    assert (ROOT / "Dockerfile").is_file()


def test_services_share_only_redis_and_the_store() -> None:
    services = load()
    named: Counter[str] = Counter()
    for name, svc in services.items():
        for mount in svc.volumes:
            source, target = mount.split(":")[:2]
            if source.startswith((".", "/")):
                # A host folder (the corpus root): read-only inputs, never a data dir.
                assert mount.endswith(":ro"), f"{name}: {mount} must be read-only"
                assert target != "/data", name
            else:
                named[source] += 1
    shared = [v for v, n in named.items() if n > 1]
    assert not shared, f"volumes shared between services: {shared}"
    assert sorted(named) == sorted(["redis", "s3", *ACTOR_NAMES])  # control: none
    for name in ACTOR_NAMES:
        assert f"{name}:/data" in services[name].volumes

    # The store: a SeaweedFS S3 server, its bucket made before any actor starts.
    s3 = services["s3"]
    assert s3.image.startswith("chrislusf/seaweedfs")
    assert "-s3" in s3.command
    assert "s3.bucket.create" in str(services["s3-bucket"].entrypoint)
    for name in (*ACTOR_NAMES, "control"):
        env = services[name].environment
        assert env["MT_STORE_URL"].startswith("s3://"), name
        for var in STORE_VARS:
            assert env.get(var), f"{name} lacks {var}"
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333"
        assert {"redis", "s3-bucket"} <= set(services[name].depends_on), name
