"""Stream and key names. One prefix so that tests and replays can use their own namespace."""

from dataclasses import dataclass
from typing import Literal, get_args

# A chat session lives this long after its last turn, and keeps its newest CHAT_MAX_TURNS
# turns (a user message is at most 4,000 characters, a reply at most max_new_tokens tokens):
# the model sees fewer anyway, as its context holds only the newest turns that fit.
CHAT_TTL_S = 24 * 3600
CHAT_MAX_TURNS = 10
# A run's log stream keeps about its newest RUN_LOG_MAXLEN lines (XADD MAXLEN ~); it and the
# run's evaluation record expire MT_RETENTION_DAYS after their last write.
RUN_LOG_MAXLEN = 10_000

ActorName = Literal["ingest", "tokenizer", "trainer", "evaluator", "uploader", "notifier"]
ACTOR_NAMES: tuple[ActorName, ...] = get_args(ActorName)
# Actors that read a command stream of their own (the notifier reads the events stream).
COMMAND_ACTORS: tuple[ActorName, ...] = ("ingest", "tokenizer", "trainer", "evaluator", "uploader")


@dataclass(frozen=True)
class Keys:
    prefix: str = "mt"

    def cmd(self, actor: ActorName) -> str:
        return f"{self.prefix}:cmd:{actor}"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def runs(self) -> str:
        """Sorted set of run ids scored by submission time (newest last)."""
        return f"{self.prefix}:runs"

    def run(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}"

    def cancel(self, run_id: str) -> str:
        return f"{self.prefix}:cancel:{run_id}"

    def done(self, command_id: str) -> str:
        return f"{self.prefix}:done:{command_id}"

    def attempt(self, command_id: str) -> str:
        """Fencing token: incremented by every consumer that starts the command."""
        return f"{self.prefix}:attempt:{command_id}"

    def tries(self, command_id: str) -> str:
        """Failed attempts so far, for the transient-error retry budget."""
        return f"{self.prefix}:tries:{command_id}"

    def progress(self, command_id: str) -> str:
        """Hash: the delivery (XPENDING's count) in which the command last made progress."""
        return f"{self.prefix}:progress:{command_id}"

    def tokenizer(self, tokenizer_id: str) -> str:
        return f"{self.prefix}:tokenizer:{tokenizer_id}"

    def corpus(self, corpus_id: str) -> str:
        """A prepared corpus's record: field `stored`, the Pointer of `corpora/<id>`."""
        return f"{self.prefix}:corpus:{corpus_id}"

    def logs(self, run_id: str) -> str:
        """A run's log: a capped stream, one entry per line (field `data`: the JSON line)."""
        return f"{self.prefix}:logs:{run_id}"

    @property
    def logs_pattern(self) -> str:
        return f"{self.prefix}:logs:*"

    def eval(self, run_id: str) -> str:
        """The run's evaluation (its chain step's metrics and samples), JSON."""
        return f"{self.prefix}:eval:{run_id}"

    def result(self, request_id: str) -> str:
        """Outcome of a score / generate / evaluate / chat request, JSON."""
        return f"{self.prefix}:result:{request_id}"

    def request(self, request_id: str) -> str:
        """Which run and route a request id belongs to, so an unknown id is a 404, not
        pending forever."""
        return f"{self.prefix}:request:{request_id}"

    def chat(self, run_id: str, session_id: str) -> str:
        """A chat session's messages, a list of JSON {role, content}, oldest first. Scoped by
        run: a session id names nothing in another run. '/' is in no id, so no two (run,
        session) pairs share a key."""
        return f"{self.prefix}:chat:{run_id}/{session_id}"

    def chat_owner(self, session_id: str) -> str:
        """The run a session id was started in over HTTP: continuing it through another run
        is a 404."""
        return f"{self.prefix}:chatrun:{session_id}"

    def heartbeat(self, actor: ActorName, consumer: str) -> str:
        """Liveness of one consumer, with a TTL; /readyz looks for one per actor kind."""
        return f"{self.prefix}:alive:{actor}:{consumer}"

    def alive_pattern(self, actor: ActorName) -> str:
        return f"{self.prefix}:alive:{actor}:*"
