"""One encoder; one decoder per stream, built once at import."""

from __future__ import annotations

import msgspec

from protocol.commands import ACCEPTS, Base, Command
from protocol.events import AnyEvent
from protocol.keys import COMMAND_ACTORS, ActorName

FIELD = "data"  # the single stream field that holds the msgspec JSON payload

encoder = msgspec.json.Encoder()


def _decoder_for(types: tuple[type[Base], ...]) -> msgspec.json.Decoder[Base]:
    # A union of Struct types is built at runtime from the registry; msgspec checks it here.
    union = types[0]
    for t in types[1:]:
        union = union | t  # type: ignore[assignment]  # runtime union of Struct classes
    return msgspec.json.Decoder(union)


COMMAND_DECODERS: dict[ActorName, msgspec.json.Decoder[Base]] = {
    actor: _decoder_for(ACCEPTS[actor]) for actor in COMMAND_ACTORS
}
any_command_decoder: msgspec.json.Decoder[Command] = msgspec.json.Decoder(Command)
event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)


def encode(obj: msgspec.Struct) -> bytes:
    return encoder.encode(obj)


def decode_command(actor: ActorName, data: bytes | str) -> Base:
    """Raises msgspec.DecodeError / ValidationError with a message naming the bad field."""
    return COMMAND_DECODERS[actor].decode(data)


def decode_event(data: bytes | str) -> AnyEvent:
    return event_decoder.decode(data)
