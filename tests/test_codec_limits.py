"""The bounds every stream payload is checked against before it is decoded: size and
nesting depth, measured on the raw bytes (protocol.codec.check_payload)."""

from __future__ import annotations

import msgspec
import pytest

from protocol.codec import (
    MAX_PAYLOAD_BYTES,
    MAX_PAYLOAD_DEPTH,
    check_payload,
    decode_command,
    decode_event,
    encode,
    nesting_depth,
)
from protocol.commands import CorpusIngest
from protocol.events import RunQueued


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"", 0),
        (b'"just a string"', 0),
        (b"{}", 1),
        (b'{"a": [1, {"b": 2}], "c": [[]]}', 3),
        (b'{"a": "[[[[{{{{"}', 1),  # brackets inside strings do not nest
        (b'{"a": "\\"[[[["}', 1),  # nor after an escaped quote
        (b"[[]][[[]]]", 3),
        (b"[[[[", 4),  # unbalanced: a decoder descends before it fails
        (b"]]][[", 2),
        (b'{"a": [1, 2}', 2),
    ],
)
def test_nesting_depth_is_what_a_decoder_would_recurse(raw: bytes, depth: int) -> None:
    assert nesting_depth(raw) == depth


def test_depth_is_counted_only_up_to_just_past_the_limit() -> None:
    assert nesting_depth(b"[" * 5000 + b"]" * 5000) == MAX_PAYLOAD_DEPTH + 1
    assert nesting_depth(b"[" * 5000) == 5000  # unmatched: counted at once


def test_payloads_at_the_limits_pass_and_past_them_are_decode_errors() -> None:
    at_depth = b"[" * MAX_PAYLOAD_DEPTH + b"]" * MAX_PAYLOAD_DEPTH
    assert check_payload(at_depth) == at_depth
    assert check_payload("{}") == b"{}"
    with pytest.raises(msgspec.DecodeError, match=f"more than {MAX_PAYLOAD_DEPTH} levels"):
        check_payload(b"[" + at_depth + b"]")
    at_size = b'"' + b"x" * (MAX_PAYLOAD_BYTES - 2) + b'"'
    assert check_payload(at_size) is at_size
    with pytest.raises(msgspec.DecodeError, match=f"over the limit of {MAX_PAYLOAD_BYTES}"):
        check_payload(at_size + b" ")


def test_commands_and_events_are_checked_before_they_are_decoded() -> None:
    cmd = encode(CorpusIngest(command_id="c", run_id="r", corpus_id="c", path="p"))
    assert decode_command("ingest", cmd).command_id == "c"
    deep = cmd[:-1] + b',"junk":' + b"[" * 3000 + b"]" * 3000 + b"}"
    with pytest.raises(msgspec.DecodeError, match="levels deep"):
        decode_command("ingest", deep)  # RecursionError in msgspec without the check
    event = encode(RunQueued(run_id="r"))
    assert decode_event(event).run_id == "r"
    with pytest.raises(msgspec.DecodeError, match="levels deep"):
        decode_event(event[:-1] + b',"junk":' + b"[" * 3000 + b"]" * 3000 + b"}")
