"""`model-trainer`: one entry point, subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from actors import log, service
from actors.config import Settings
from protocol.keys import ACTOR_NAMES, ActorName


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    names = list(ACTOR_NAMES)
    with service.redis_for(settings) as url:

        async def ready() -> None:
            print(f"redis:   {url}", flush=True)
            print(f"data:    {settings.data_dir}", flush=True)
            print(f"actors:  {', '.join(n for n in names if n in service.ACTORS)}", flush=True)

        service.run(service.serve(settings, url, names, on_ready=ready))
    return 0


def cmd_actor(args: argparse.Namespace, settings: Settings) -> int:
    name: ActorName = args.name
    if name not in service.ACTORS:
        print(f"model-trainer: actor {name!r} is not available in this version", file=sys.stderr)
        return 2
    if not settings.redis_url:
        print("model-trainer actor: set REDIS_URL to the shared Redis", file=sys.stderr)
        return 2
    service.run(service.serve(settings, settings.redis_url, [name]))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "up": cmd_up,
    "actor": cmd_actor,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="model-trainer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="embedded Redis (unless REDIS_URL) + every actor")
    up.add_argument("--host", default=None)
    up.add_argument("--port", type=int, default=None)
    actor = sub.add_parser("actor", help="run one actor against REDIS_URL")
    actor.add_argument("name", choices=ACTOR_NAMES)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = Settings.from_env()
    log.configure(settings.data_dir)
    return COMMANDS[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
