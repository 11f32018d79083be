"""No Docker engine here: check that compose.yaml parses and wires every actor."""

from __future__ import annotations

from pathlib import Path

import yaml

from protocol.keys import ACTOR_NAMES

ROOT = Path(__file__).resolve().parent.parent


def test_compose_runs_redis_every_actor_and_control_from_one_image() -> None:
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"redis", "control", *ACTOR_NAMES}
    assert "--appendonly" in services["redis"]["command"]
    for name in ACTOR_NAMES:
        svc = services[name]
        assert svc["command"] == ["model-trainer", "actor", name]
        assert svc["environment"]["REDIS_URL"].startswith("redis://redis:")
    images = {services[n]["image"] for n in (*ACTOR_NAMES, "control")}
    assert len(images) == 1
    assert services["control"]["command"][:2] == ["model-trainer", "control"]
    assert services["trainer"]["build"] == "."
    assert (ROOT / "Dockerfile").is_file()
