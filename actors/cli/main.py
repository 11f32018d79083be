"""`model-trainer`: one entry point; argparse subcommands, dispatched through COMMANDS.

Against a running service every subcommand talks to Redis directly: REDIS_URL, or else the
embedded server of a running `model-trainer up` on the same data dir (it writes its URL to
`<data_dir>/redis/url`). `train` and `tokenizer train` with no service running start one in
this process (embedded Redis + every actor) for the duration of the run.

Exit codes: 0 done; 1 the run or request failed or was cancelled (or `replay diff` found
different kinds); 2 bad input (flags, request fields, unknown run); 3 no Redis to talk to;
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.cli.common import CliError, err
from actors.cli.flags import GENERATE_FIELDS, TOKENIZER_FIELDS, TRAIN_FIELDS
from actors.cli.replay_cmds import cmd_replay, cmd_trim
from actors.cli.run_cmds import (
    cmd_cancel,
    cmd_eval,
    cmd_events,
    cmd_generate,
    cmd_runs,
    cmd_status,
    cmd_tokenizer,
    cmd_train,
    cmd_watch,
)
from actors.cli.serve_cmds import cmd_actor, cmd_control, cmd_demo, cmd_gc, cmd_up
from actors.cli.service_ctx import log_to_file
from actors.runtime import log
from actors.runtime.config import Settings
from protocol.flags import add_flags
from protocol.keys import ACTOR_NAMES
from trainer.errors import UserError

Handler = Callable[[argparse.Namespace, Settings], Awaitable[int]]

COMMANDS: dict[str, Handler] = {
    "demo": cmd_demo,
    "up": cmd_up,
    "actor": cmd_actor,
    "control": cmd_control,
    "train": cmd_train,
    "tokenizer": cmd_tokenizer,
    "runs": cmd_runs,
    "status": cmd_status,
    "watch": cmd_watch,
    "cancel": cmd_cancel,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "events": cmd_events,
    "replay": cmd_replay,
    "trim": cmd_trim,
    "gc": cmd_gc,
}


# ------------------------------------------------------------------------------- parsing
def _follow_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="request fields from a TOML file")
    p.add_argument("--detach", action="store_true", help="submit and return (do not follow)")
    p.add_argument("--json", action="store_true", help="print the created run as JSON")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="model-trainer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="embedded Redis (unless REDIS_URL) + every actor + endpoint")
    up.add_argument("--host", default=None, help="control endpoint host (MT_HTTP_HOST)")
    up.add_argument("--port", type=int, default=None, help="control endpoint port (MT_HTTP_PORT)")
    actor = sub.add_parser("actor", help="run one actor against the shared Redis")
    actor.add_argument("name", choices=ACTOR_NAMES)
    control = sub.add_parser("control", help="the control endpoint only, against a running service")
    control.add_argument("--host", default=None)
    control.add_argument("--port", type=int, default=None)

    train = sub.add_parser("train", help="train a tokenizer + model and follow the run")
    _follow_flags(train)
    add_flags(train.add_argument_group("run settings (override the --config file)"), TRAIN_FIELDS)
    tok = sub.add_parser("tokenizer", help="tokenizer jobs")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tok_train = tok_sub.add_parser("train", help="train a tokenizer and follow the job")
    _follow_flags(tok_train)
    add_flags(
        tok_train.add_argument_group("tokenizer settings (override the --config file)"),
        TOKENIZER_FIELDS,
    )

    runs = sub.add_parser("runs", help="recent runs")
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--json", action="store_true")
    status = sub.add_parser("status", help="a run's state")
    status.add_argument("run")
    status.add_argument("--json", action="store_true")
    watch_p = sub.add_parser("watch", help="live progress of a run until it ends")
    watch_p.add_argument("run")
    cancel = sub.add_parser("cancel", help="cancel a run")
    cancel.add_argument("run")
    events = sub.add_parser("events", help="a run's recorded events, one line each")
    events.add_argument("run")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument("--follow", action="store_true", help="keep printing until the run ends")

    ev = sub.add_parser("eval", help="evaluate a run and print its metrics")
    ev.add_argument("run")
    ev.add_argument("--split", default="test", choices=["validation", "test"])
    ev.add_argument("--path", default="", help="a text file under the corpus root instead")
    gen = sub.add_parser("generate", help="sample text from a run's model")
    gen.add_argument("run")
    gen.add_argument("prompt", nargs="?", default="")
    add_flags(gen, GENERATE_FIELDS, {"num_return_sequences": ["--num"]})
    for request in (ev, gen):
        request.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
        request.add_argument("--user-id", type=int, default=0)
        request.add_argument("--json", action="store_true")

    rp = sub.add_parser("replay", help="re-drive recorded commands into a fresh prefix")
    rp.add_argument("--run", help="replay this run (its first chain command; see --all)")
    rp.add_argument("--all", action="store_true", help="every recorded command of the run")
    rp.add_argument("--stream", help="or: an id range of this command stream (actor name)")
    rp.add_argument("--start", default="-", help="first entry id (default: the oldest)")
    rp.add_argument("--end", default="+", help="last entry id (default: the newest)")
    rp.add_argument("--to-prefix", help="fresh key prefix (default <prefix>-replay-<id>)")
    rp.add_argument("--data-dir", type=Path, help="default <data_dir>/replays/<to-prefix>")
    mode = rp.add_mutually_exclusive_group()
    mode.add_argument("--step", action="store_true", help="then handle exactly one command")
    mode.add_argument("--drain", action="store_true", help="then handle all, one at a time")
    rp_sub = rp.add_subparsers(dest="replay_command", metavar="{step,diff}")
    rp_step = rp_sub.add_parser("step", help="handle exactly one queued command of a prefix")
    rp_step.add_argument("--prefix", required=True)
    rp_step.add_argument("--data-dir", type=Path)
    rp_step.add_argument("--until-idle", action="store_true", help="one at a time until none")
    rp_diff = rp_sub.add_parser("diff", help="compare a run's events in two prefixes")
    rp_diff.add_argument("--run", required=True)
    rp_diff.add_argument("--prefix", help="default MT_PREFIX")
    rp_diff.add_argument("--against", required=True)
    rp_diff.add_argument("--ignore", action="append", metavar="KIND", help="skip these kinds")

    demo = sub.add_parser("demo", help="the main job end to end on the embedded service")
    demo.add_argument("--quick", action="store_true", help="a smaller run (about a minute)")

    trim = sub.add_parser("trim", help="trim old stream entries (never pending ones)")
    trim.add_argument("--days", type=float, default=None, help="MT_RETENTION_DAYS (14)")
    gc = sub.add_parser("gc", help="evict stored folders from this data dir over MT_CACHE_GB")
    gc.add_argument("--limit-gb", type=float, default=None, help="instead of MT_CACHE_GB")
    return p


async def run(argv: Sequence[str], settings: Settings | None = None) -> int:
    """Parse and run one command in the running event loop (tests call this)."""
    args = parser().parse_args(list(argv))
    settings = settings or Settings.from_env()
    try:
        return await COMMANDS[args.command](args, settings)
    except CliError as e:
        err(e.message)
        return e.code
    except UserError as e:
        err(str(e))
        return 2
    except (RedisConnectionError, RedisTimeoutError) as e:
        err(f"cannot reach Redis: {e}")
        return 3


async def _main(argv: Sequence[str]) -> int:
    # SIGTERM ends a command as Ctrl-C does (`up` installs its own orderly stop instead).
    task = asyncio.current_task()
    terminated = asyncio.Event()

    def on_sigterm() -> None:
        terminated.set()
        if task is not None:
            task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await run(argv)
    except asyncio.CancelledError:
        if not terminated.is_set():
            raise  # Ctrl-C: asyncio.run turns it into KeyboardInterrupt
        err("terminated")
        return 143


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    settings = Settings.from_env()
    log.configure()
    # The demo's output is the story of its run; the actors' log lines go to a file.
    if args[:1] == ["demo"] or (args[:1] in (["train"], ["tokenizer"]) and sys.stdout.isatty()):
        log_to_file(settings)
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
