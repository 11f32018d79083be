from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from actors.runtime import Runtime, RuntimeConfig
from protocol.codec import FIELD, decode_event, encode
from protocol.commands import CorpusIngest
from protocol.keys import Keys
from tests.actors_for_tests import ScriptedActor


async def test_a_command_is_handled_once_and_acknowledged(
    redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    cmd = CorpusIngest(command_id="c1", run_id="r1", corpus_id="k1", path="ok")
    await redis.xadd(keys.cmd("ingest"), {FIELD: encode(cmd)})
    rt = Runtime(ScriptedActor(tmp_path), redis, keys=keys, consumer="t-0",
                 config=RuntimeConfig(block_ms=50))
    await rt.run(until_idle=True)
    events = [decode_event(f[FIELD.encode()]) for _, f in await redis.xrange(keys.events)]
    kinds = [type(e).__struct_config__.tag for e in events]
    assert kinds == ["step.started", "corpus.ready", "step.completed", "run.completed"]
    assert await redis.xpending(keys.cmd("ingest"), "ingest") == {
        "pending": 0, "min": None, "max": None, "consumers": []
    }
