"""A run's log in Redis: one capped stream per run (`<prefix>:logs:<run_id>`), so any
process that reaches Redis serves it, wherever the run's actors ran.

structlog processors are synchronous and may run in any thread, so the processor only
queues the line (`RunLog.put`: a lock and a deque, never a wait); the runtime's flusher task
(`RunLog.run`) writes what is queued in batches, one script call per batch (XADD MAXLEN ~
per line, EXPIRE per run, atomically: N commands from Python cost the event loop several
times what one call with N arguments does), and `drain` writes the rest when the runtime
stops, so a clean stop loses no line. While Redis is unreachable the queue keeps at most
`backlog_bytes` of the newest lines; the older ones are dropped and counted, and once Redis
is back each run that lost lines gets a line saying how many, and the count is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from datetime import UTC, datetime

import msgspec
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.runtime import log
from actors.runtime.connection import Redis
from protocol.codec import FIELD
from protocol.keys import RUN_LOG_MAXLEN, Keys

LINE_MAX_BYTES = 16 * 1024  # a longer line is cut (a traceback's end is already bounded)
BACKLOG_BYTES = 4 * 1024 * 1024  # queued while Redis is unreachable, newest kept
BATCH = 500  # lines per MULTI/EXEC
DRAIN_S = 5.0  # at stop: how long to try to write what is queued
RETRY_MAX_S = 5.0
# A line waits this long for others to share its write: a busy actor costs Redis at most
# ~20 writes a second, not one per line (a follower of the log sees it that much later).
GATHER_S = 0.05


# KEYS: the runs' log streams; ARGV: MAXLEN, TTL, the field, then (key index, line) pairs.
_WRITE = """
local i = 4
while i <= #ARGV do
  redis.call('XADD', KEYS[tonumber(ARGV[i])], 'MAXLEN', '~', ARGV[1], '*', ARGV[3], ARGV[i + 1])
  i = i + 2
end
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ARGV[2]) end
return 1
"""


class _Note(msgspec.Struct):
    """The line a run's log gets where lines of it were dropped."""

    event: str
    dropped: int
    run_id: str
    level: str = "warning"
    timestamp: str = ""


class RunLog:
    """The queue of one runtime's run log lines and their writer."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        ttl_s: int,
        maxlen: int = RUN_LOG_MAXLEN,
        backlog_bytes: int = BACKLOG_BYTES,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self.maxlen = maxlen
        self.backlog_bytes = backlog_bytes
        self._lock = threading.Lock()
        self._lines: deque[tuple[str, bytes]] = deque()
        self._bytes = 0
        self._dropped: dict[str, int] = {}  # per run, not yet reported
        self._writing = (0, 0)  # (lines, dropped) of the batch being written
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake = asyncio.Event()
        self._down = False  # the last write failed: Redis unreachable
        self._write = redis.register_script(_WRITE)

    def _log(self) -> structlog.stdlib.BoundLogger:
        # Made per use (rarely): a logger cached at import would miss a later configuration.
        return log.get("runlog").bind(prefix=self.keys.prefix)

    # ------------------------------------------------------------------ any thread
    def put(self, run_id: str, line: bytes) -> None:
        """Queue one line of the run's log. From any thread; never blocks, never raises."""
        line = line[:LINE_MAX_BYTES]
        with self._lock:
            wake = not self._lines
            self._lines.append((run_id, line))
            self._bytes += len(line)
            self._bound()
            loop = self._loop
        if not wake or loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody flushes
                loop.call_soon_threadsafe(self._wake.set)

    def _bound(self) -> None:
        """Drop the oldest lines past the backlog (under the lock)."""
        while self._bytes > self.backlog_bytes and len(self._lines) > 1:
            run_id, old = self._lines.popleft()
            self._bytes -= len(old)
            self._dropped[run_id] = self._dropped.get(run_id, 0) + 1

    @property
    def queued(self) -> int:
        """Lines not written yet (those of a write under way included)."""
        with self._lock:
            return len(self._lines) + self._writing[0]

    @property
    def dropped(self) -> int:
        """Lines dropped and not yet reported in their run's log."""
        with self._lock:
            return sum(self._dropped.values()) + self._writing[1]

    # ------------------------------------------------------------------- the loop
    async def run(self) -> None:
        """Write queued lines as they come, until cancelled (then `drain`)."""
        self._wake = asyncio.Event()  # of this loop (a runtime may be run again in another)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        failures = 0
        while True:
            self._wake.clear()
            with self._lock:
                idle = not self._lines and not self._dropped
                full = len(self._lines) >= BATCH
            if idle:
                await self._wake.wait()
            if not full:
                await asyncio.sleep(GATHER_S)
            if await self._flush_batch():
                failures = 0
            else:
                failures += 1
                await asyncio.sleep(min(RETRY_MAX_S, 0.05 * 2**failures))

    async def drain(self, timeout_s: float = DRAIN_S) -> None:
        """Write everything queued (the runtime stops); when Redis stays unreachable for
        `timeout_s`, say how many lines are lost."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while True:
                    with self._lock:
                        if not self._lines and not self._dropped:
                            return
                    if not await self._flush_batch():
                        await asyncio.sleep(0.1)
        with self._lock:
            lost = len(self._lines) + sum(self._dropped.values())
            self._lines.clear()
            self._bytes = 0
            self._dropped.clear()
        self._log().warning("run log lines not written: redis unreachable at stop", lost=lost)

    async def _flush_batch(self) -> bool:
        """Write up to BATCH queued lines (with notes of dropped ones) in one MULTI/EXEC;
        False when Redis was unreachable (the lines are queued again, oldest first)."""
        with self._lock:
            batch = [self._lines.popleft() for _ in range(min(BATCH, len(self._lines)))]
            self._bytes -= sum(len(line) for _, line in batch)
            dropped, self._dropped = self._dropped, {}
            self._writing = (len(batch), sum(dropped.values()))
        if not batch and not dropped:
            return True
        # The dropped lines were older than any queued one: their note comes first.
        now = datetime.now(UTC).isoformat()
        notes = [
            (
                run_id,
                msgspec.json.encode(
                    _Note("log lines dropped while redis was unreachable", n, run_id, timestamp=now)
                ),
            )
            for run_id, n in dropped.items()
        ]
        index: dict[str, int] = {}  # run id -> its key's position in KEYS (1-based)
        args: list[str | bytes] = [str(self.maxlen), str(self.ttl_s), FIELD]
        for run_id, line in [*notes, *batch]:
            args += [str(index.setdefault(run_id, len(index) + 1)), line]
        written = False
        try:
            await self._write(keys=[self.keys.logs(run_id) for run_id in index], args=args)
            written = True
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            if not self._down:
                self._log().warning("run logs: redis unreachable, lines queued", error=str(e))
            self._down = True
            return False
        except RedisError as e:
            # Not an outage (a key of another type, say): retrying would fail the same way.
            written = True
            self._log().error("run log lines not written", error=str(e), lines=len(batch))
        finally:
            with self._lock:
                self._writing = (0, 0)
                if not written:  # unreachable, or cancelled mid-write: keep them, oldest first
                    self._lines.extendleft(reversed(batch))
                    self._bytes += sum(len(line) for _, line in batch)
                    for run_id, n in dropped.items():
                        self._dropped[run_id] = self._dropped.get(run_id, 0) + n
                    self._bound()
        if self._down or dropped:
            self._down = False
            if dropped:
                self._log().warning(
                    "run log lines were dropped while redis was unreachable",
                    dropped=sum(dropped.values()),
                    runs=sorted(dropped),
                )
        return True
