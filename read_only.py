"""Viewers may look, not touch: a gate for Perspective's websocket requests.

perspective-python's Tornado handler passes every websocket message to the
Perspective server, and the protocol lets any client write: a second browser
could clear the table, replace it, or host tables of its own. There is no
read-only switch, so this module reads each request and lets through only
what a <perspective-viewer> needs to look at data.

A request is a protobuf `perspective.proto.Request`: field 1 is the message
id, field 2 the table or view it is about, and one field numbered 3 and up
is the request itself (`client_req` in Perspective's perspective.proto).
Reading that takes a few lines of wire format, not a protobuf library.

The gate checks more than the request type. Perspective 4.3.0 crashes the
whole process (segfault or abort) on some requests a real viewer never
sends, which the fuzz test found: a malformed view config, or two views
made under one message id. So every request must match the message layout
below field by field, may only name hosted tables and views its own
connection created, and each view creation needs a message id of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

# Message layouts, from perspective.proto: field number -> kind, where a
# kind is "varint", "double", "string", or a nested layout (a dict).
# Fields not listed make the request malformed.
_VIEWPORT = {1: "varint", 2: "varint", 3: "varint", 4: "varint"}
_SCALAR = {1: "varint", 4: "double", 6: "string", 7: "varint"}
_STRING_PAIR = {1: "string", 2: "string"}  # a map<string, string> entry
_VIEW_CONFIG = {
    1: "string",                                     # group_by
    2: "string",                                     # split_by
    3: {1: "varint", 2: {1: "string"}},              # columns
    4: {1: "string", 2: "string", 3: _SCALAR},       # filter
    5: {1: "string", 2: "varint"},                   # sort
    6: _STRING_PAIR,                                 # expressions
    7: {1: "string", 2: {1: "string"}},              # aggregates
    8: "varint",                                     # filter_op
    9: "varint",                                     # group_by_depth
    10: "varint",                                    # group_rollup_mode (4.x)
}
_SERIALIZE = {1: _VIEWPORT, 2: "varint", 3: "varint", 4: "varint", 5: "varint"}

# The requests a viewer sends: Request field number -> (name, layout).
# Anything else is refused: update (33), replace (32, which clear() uses),
# remove (31), table delete (28), make table (27), and any number not here.
VIEWER_REQUESTS = {
    3: ("get_features", {}),
    4: ("get_hosted_tables", {1: "varint"}),
    37: ("remove_hosted_tables_update", {1: "varint"}),
    # The viewer asks for a port when it opens a table. A port is only an id
    # to tag updates with, and updates are refused, so it grants nothing.
    5: ("table_make_port", {}),
    6: ("table_make_view", {1: "string", 2: _VIEW_CONFIG}),
    7: ("table_schema", {}),
    8: ("table_size", {}),
    9: ("table_validate_expr", {1: _STRING_PAIR}),
    29: ("table_on_delete", {}),
    30: ("table_remove_delete", {1: "varint"}),
    10: ("view_column_paths", {1: "varint", 2: "varint"}),
    11: ("view_delete", {}),
    12: ("view_dimensions", {}),
    13: ("view_expression_schema", {}),
    14: ("view_get_config", {}),
    15: ("view_schema", {}),
    16: ("view_to_arrow", {1: _VIEWPORT, 2: "string"}),
    17: ("server_system_info", {}),
    18: ("view_collapse", {1: "varint"}),
    19: ("view_expand", {1: "varint"}),
    20: ("view_get_min_max", {1: "string"}),
    21: ("view_on_update", {1: "varint"}),
    22: ("view_remove_on_update", {1: "varint"}),
    23: ("view_set_depth", {1: "varint"}),
    24: ("view_to_columns_string", _SERIALIZE),
    25: ("view_to_csv", {1: _VIEWPORT}),
    26: ("view_to_rows_string", _SERIALIZE),
    36: ("view_to_ndjson_string", _SERIALIZE),
    34: ("view_on_delete", {}),
    35: ("view_remove_delete", {1: "varint"}),
}
_ABOUT_SERVER = {3, 4, 17, 37}
_ABOUT_TABLE = {5, 6, 7, 8, 9, 29, 30}
_MAKE_VIEW = 6
_MAX_DEPTH = 8


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


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yields (field number, wire type, value) for each field of a message."""
    at = 0
    while at < len(data):
        tag, at = _varint(data, at)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, at = _varint(data, at)
        elif wire_type == 2:
            length, at = _varint(data, at)
            if at + length > len(data):
                raise MalformedRequest("field longer than the message")
            value, at = data[at:at + length], at + length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            if at + size > len(data):
                raise MalformedRequest("truncated field")
            value, at = data[at:at + size], at + size
        else:
            raise MalformedRequest(f"wire type {wire_type}")
        if number == 0:
            raise MalformedRequest("field number 0")
        yield number, wire_type, value


def _check(data: bytes, layout: dict, depth: int = 0) -> None:
    """Raises MalformedRequest unless `data` is a message of `layout`."""
    if depth > _MAX_DEPTH:
        raise MalformedRequest("nested too deep")
    for number, wire_type, value in _fields(data):
        kind = layout.get(number)
        if kind is None:
            raise MalformedRequest(f"unexpected field {number}")
        expected = {"varint": 0, "double": 1}.get(kind, 2) if isinstance(kind, str) else 2
        if wire_type != expected:
            raise MalformedRequest(f"field {number} has wire type {wire_type}")
        if kind == "string":
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedRequest(f"field {number} is not UTF-8") from None
        elif isinstance(kind, dict):
            _check(value, kind, depth + 1)


def parse_request(data: bytes) -> tuple[int, bytes, int, bytes]:
    """Returns (msg_id, entity_id, request type, request body) of a Request
    a viewer may send; raises MalformedRequest for anything else."""
    msg_id, entity_id, kind, body = 0, b"", None, b""
    for number, wire_type, value in _fields(data):
        if number == 1 and wire_type == 0:
            msg_id = value
        elif number == 2 and wire_type == 2:
            entity_id = value
        elif number in VIEWER_REQUESTS and wire_type == 2 and kind is None:
            kind, body = number, value
        else:
            raise MalformedRequest(f"field {number} is not a viewer request")
    if kind is None:
        raise MalformedRequest("no request")
    try:
        entity_id.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequest("entity id is not UTF-8") from None
    _check(body, VIEWER_REQUESTS[kind][1])
    return msg_id, entity_id, kind, body


def is_allowed(data: bytes) -> bool:
    """True if the request is a well-formed request of a type a viewer sends.

    This is the stateless half of the check; ViewerGate adds which tables and
    views a connection may address.
    """
    try:
        parse_request(data)
    except MalformedRequest:
        return False
    return True


class ViewerGate:
    """The per-connection check: well-formed read requests, about hosted
    tables and about views this connection created."""

    def __init__(self, tables):
        self.tables = {name.encode() for name in tables}
        self.views: set[bytes] = set()
        self._view_messages: set[int] = set()
        self.reason: str | None = None

    def allows(self, data: bytes) -> bool:
        self.reason = self._refuse(data)
        return self.reason is None

    def _refuse(self, data: bytes) -> str | None:
        """None to let the request through, else why not."""
        try:
            msg_id, entity_id, kind, body = parse_request(data)
        except MalformedRequest as error:
            return str(error)
        if kind in _ABOUT_SERVER:
            return None
        if kind in _ABOUT_TABLE:
            if entity_id not in self.tables:
                return "not a hosted table"
            if kind == _MAKE_VIEW:
                view_id = next((value for number, _, value in _fields(body) if number == 1), b"")
                if not view_id or view_id in self.views or msg_id in self._view_messages:
                    return "view id or message id already used"
                # Usable at once, and for good: the viewer sends requests
                # about a new view before the answer to its creation, and
                # after deleting it (Perspective answers "View not found").
                self.views.add(view_id)
                self._view_messages.add(msg_id)
            return None
        if entity_id not in self.views:
            return "not a view of this connection"
        return None


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def refusal(data: bytes, message: str = "this dashboard is read-only") -> bytes | None:
    """A Response carrying a ServerError for the request, so the client's
    promise rejects instead of waiting forever; None if the request is not
    even valid protobuf. (A message id of 0 is absent on the wire.)"""
    msg_id, entity_id = 0, b""
    try:
        for number, wire_type, value in _fields(data):
            if number == 1 and wire_type == 0:
                msg_id = value
            elif number == 2 and wire_type == 2:
                entity_id = value
        entity_id.decode("utf-8")
    except (MalformedRequest, UnicodeDecodeError):
        return None
    error = _field(1, message.encode())  # ServerError.message; status 0 = SERVER_ERROR
    return _encode_varint(1 << 3) + _encode_varint(msg_id) + _field(2, entity_id) + _field(50, error)
