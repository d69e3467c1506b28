"""Viewers may look, not touch: a gate for Perspective's websocket requests.

perspective-python's Tornado handler passes every websocket message to the
Perspective server, and the protocol lets any client write: a second browser
could clear the table, replace it, or host tables of its own. There is no
read-only switch, so this module reads each request's type and lets through
only what a <perspective-viewer> needs to look at data.

A request is a protobuf `perspective.proto.Request`: field 1 is the message
id, field 2 the table or view it is about, and exactly one field numbered 3
and up says what it is (`client_req` in Perspective's perspective.proto).
Reading that needs a few lines of wire format, not a protobuf library.
"""

from __future__ import annotations

# Request types a viewer uses, by their field number in the Request message.
# Anything else (update 33, replace 32 (which clear() uses), remove 31,
# table delete 28, make table 27) and any number this list does not know is
# refused.
VIEWER_REQUESTS = {
    3: "get_features",
    # The viewer asks for a port when it opens a table. A port is only an id
    # to tag updates with, and updates are refused, so it grants nothing.
    5: "table_make_port",
    4: "get_hosted_tables",
    37: "remove_hosted_tables_update",
    6: "table_make_view",
    7: "table_schema",
    8: "table_size",
    9: "table_validate_expr",
    10: "view_column_paths",
    11: "view_delete",
    12: "view_dimensions",
    13: "view_expression_schema",
    14: "view_get_config",
    15: "view_schema",
    16: "view_to_arrow",
    17: "server_system_info",
    18: "view_collapse",
    19: "view_expand",
    20: "view_get_min_max",
    21: "view_on_update",
    22: "view_remove_on_update",
    23: "view_set_depth",
    24: "view_to_columns_string",
    25: "view_to_csv",
    26: "view_to_rows_string",
    36: "view_to_ndjson_string",
    29: "table_on_delete",
    30: "table_remove_delete",
    34: "view_on_delete",
    35: "view_remove_delete",
}


class MalformedRequest(ValueError):
    pass


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise MalformedRequest("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def parse_request(data: bytes) -> tuple[int, bytes, int | None]:
    """Returns (msg_id, entity_id, request type field number) of a Request."""
    msg_id, entity_id, kind = 0, b"", None
    at = 0
    while at < len(data):
        tag, at = _varint(data, at)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, at = _varint(data, at)
            if number == 1:
                msg_id = value
        elif wire_type == 2:
            length, at = _varint(data, at)
            if at + length > len(data):
                raise MalformedRequest("field longer than the message")
            if number == 2:
                entity_id = data[at:at + length]
            elif number >= 3:
                kind = number if kind is None else kind
            at += length
        elif wire_type == 1:
            at += 8
        elif wire_type == 5:
            at += 4
        else:
            raise MalformedRequest(f"wire type {wire_type}")
        if at > len(data):
            raise MalformedRequest("truncated field")
    return msg_id, entity_id, kind


def is_allowed(data: bytes) -> bool:
    try:
        _, entity_id, kind = parse_request(data)
        entity_id.decode("utf-8")  # protobuf strings must be UTF-8
    except (MalformedRequest, UnicodeDecodeError):
        return False
    return kind in VIEWER_REQUESTS


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def refusal(data: bytes, message: str = "this dashboard is read-only") -> bytes | None:
    """A Response carrying a ServerError for the request, so the client's
    promise rejects instead of waiting forever; None if the request is too
    broken to answer."""
    try:
        msg_id, entity_id, _ = parse_request(data)
        entity_id.decode("utf-8")
    except (MalformedRequest, UnicodeDecodeError):
        return None
    error = _field(1, message.encode())  # ServerError.message; status_code 0 = SERVER_ERROR
    return _encode_varint(1 << 3) + _encode_varint(msg_id) + _field(2, entity_id) + _field(50, error)
