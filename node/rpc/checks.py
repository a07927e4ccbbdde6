"""Checks of request fields the executor never sees: session ids, push lists, gossip batches.

The codec checks that bytes hold the tensor (or msgpack map) they claim; the executor checks what a
step does to its session (shapes against the span, positions, lengths, limits). What is left is here."""

from __future__ import annotations

from node.runtime.errors import InvalidRequest

MAX_ID_CHARS = 128           # a session id (clients use 32 hex digits)
MAX_ADDRESS_CHARS = 255      # HOST:PORT of a push target
MAX_GOSSIP_RECORDS = 256     # records in one Gossip request (each costs a signature check)
MAX_RECORD_FIELD_BYTES = 16 * 1024  # payload, key or signature of one record (sealed payloads included)
MAX_DETAILS_CHARS = 1000     # a status message echoes request fields: never more than this goes back


def check_id(value: str, field: str) -> None:
    """A session id: 1..MAX_ID_CHARS printable characters."""
    if not value:
        raise InvalidRequest(f"{field} is empty")
    if len(value) > MAX_ID_CHARS:
        raise InvalidRequest(f"{field} of {len(value)} characters exceeds the limit of {MAX_ID_CHARS}")
    if not value.isprintable():
        raise InvalidRequest(f"{field} {value!r} holds control characters")


def check_address(value: str, field: str) -> None:
    """HOST:PORT or [IPv6]:PORT, printable ASCII, port 1..65535."""
    host, _, port = value.rpartition(":")
    ok = (0 < len(value) <= MAX_ADDRESS_CHARS and value.isascii() and value.isprintable() and " " not in value
          and host and port.isdigit() and 0 < int(port) < 65536)
    if ok and host.startswith("["):
        ok = host.endswith("]") and len(host) > 2
    if not ok:
        raise InvalidRequest(f"{field} {value[:MAX_ADDRESS_CHARS]!r} is not HOST:PORT")


def check_push_targets(targets) -> None:
    """Every hop of a push list names a reachable-looking address and a valid session id (the count and
    empty fields are node.rpc.push.check_targets's)."""
    for index, target in enumerate(targets):
        check_address(target.address, f"push[{index}].address")
        check_id(target.session_id, f"push[{index}].session_id")


def check_gossip(request) -> None:
    """A Gossip batch small enough to verify on the event loop: each list of signed records in it (records,
    strikes) holds at most MAX_GOSSIP_RECORDS, each field at most MAX_RECORD_FIELD_BYTES. The registry
    then checks each record itself."""
    for field in request.DESCRIPTOR.fields:
        if field.message_type is None or field.message_type.name != "SignedRecord":
            continue
        items = getattr(request, field.name)
        if len(items) > MAX_GOSSIP_RECORDS:
            raise InvalidRequest(
                f"{len(items)} {field.name} in one Gossip request exceed the limit of {MAX_GOSSIP_RECORDS}"
            )
        for index, record in enumerate(items):
            for name in ("payload", "public_key", "signature"):
                size = len(getattr(record, name))
                if size > MAX_RECORD_FIELD_BYTES:
                    raise InvalidRequest(
                        f"{field.name}[{index}].{name} of {size} bytes exceeds {MAX_RECORD_FIELD_BYTES}"
                    )


def details(message: str) -> str:
    """A status message cut to MAX_DETAILS_CHARS (it travels in trailers, which clients cap at a few KiB)."""
    return message if len(message) <= MAX_DETAILS_CHARS else message[: MAX_DETAILS_CHARS - 3] + "..."
