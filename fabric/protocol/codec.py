"""Encoding and decoding of message bodies: the only module that touches msgpack and json.

Submissions may be ``application/msgpack`` or ``application/json``; replies go back in the content type
of the submission. Internal messages (tasks, events, RPC) are msgpack.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack

from fabric.errors import ProtocolError

#: Content type of every internal message.
MSGPACK = "application/msgpack"
#: The other content type a submission may use.
JSON = "application/json"

_ALIASES = {
    "application/msgpack": MSGPACK,
    "application/x-msgpack": MSGPACK,
    "application/vnd.msgpack": MSGPACK,
    "application/json": JSON,
}


def normalize_content_type(content_type: str | None) -> str | None:
    """Map a content type (with optional ``; charset=...``) to MSGPACK or JSON, else None."""
    if not content_type:
        return None
    base = content_type.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        # JSON has no bytes: carry them as base64 text rather than failing the whole reply.
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode(value: Any, content_type: str = MSGPACK) -> bytes:
    """Encode ``value`` as ``content_type``.

    Raises:
        ProtocolError: the value cannot be represented (for example an arbitrary object).
    """
    try:
        if normalize_content_type(content_type) == JSON:
            try:
                return json.dumps(value, default=_json_default, separators=(",", ":")).encode()
            except TypeError:
                # Map keys JSON cannot have (bytes, tuples from msgpack): carry them as text.
                return json.dumps(_json_keys(value), default=_json_default, separators=(",", ":")).encode()
        return msgpack.packb(value, use_bin_type=True, default=_msgpack_default)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise ProtocolError(f"cannot encode value as {content_type}: {exc}") from exc


def _json_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {_json_key(k): _json_keys(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_keys(v) for v in value]
    return value


def _json_key(key: Any) -> str | int | float | bool | None:
    if isinstance(key, str | int | float | bool) or key is None:
        return key
    if isinstance(key, bytes | bytearray):
        return bytes(key).decode("utf-8", "replace")
    return str(key)


def _msgpack_default(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not msgpack serializable")


def decode(data: bytes, content_type: str | None = MSGPACK) -> Any:
    """Decode ``data`` of ``content_type``.

    Raises:
        ProtocolError: unsupported content type or malformed bytes; ``.data`` keeps the payload.
    """
    kind = normalize_content_type(content_type)
    if kind is None:
        raise ProtocolError(f"unsupported content type {content_type!r}", data)
    try:
        if kind == JSON:
            return json.loads(data)
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (
        ValueError,
        TypeError,
        RecursionError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
    ) as exc:
        raise ProtocolError(f"malformed {kind} body: {exc}", data) from exc
