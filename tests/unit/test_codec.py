"""protocol.codec round trips and failures, and the typed header readers."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.errors import FabricError, ProtocolError
from fabric.protocol import codec, headers

#: Values both msgpack and JSON carry unchanged (JSON has no bytes and no non-string keys).
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-100, 100), children, max_size=4)
    ),
    max_leaves=20,
)


@given(_MSGPACK_VALUES)
def test_msgpack_round_trip(value: Any) -> None:
    assert codec.decode(codec.encode(value)) == value


@given(_JSON_VALUES)
def test_json_round_trip(value: Any) -> None:
    encoded = codec.encode(value, codec.JSON)

    assert json.loads(encoded) == value
    assert codec.decode(encoded, codec.JSON) == value


def test_default_content_type_is_msgpack() -> None:
    encoded = codec.encode({"a": [1, b"\x00"]})

    assert msgpack.unpackb(encoded, raw=False) == {"a": [1, b"\x00"]}
    assert codec.decode(encoded) == {"a": [1, b"\x00"]}


def test_bytes_become_base64_text_in_json() -> None:
    raw = b"\x00\xffbinary"

    decoded = codec.decode(codec.encode({"blob": raw, "list": [bytearray(b"ab")]}, codec.JSON), codec.JSON)

    assert decoded == {"blob": base64.b64encode(raw).decode("ascii"), "list": ["YWI="]}


def test_sets_and_tuples_become_lists() -> None:
    assert codec.decode(codec.encode({"s": {3}, "t": (1, 2)}, codec.JSON), codec.JSON) == {
        "s": [3],
        "t": [1, 2],
    }
    assert codec.decode(codec.encode({"s": frozenset({3}), "t": (1, 2)})) == {"s": [3], "t": [1, 2]}


@pytest.mark.parametrize("alias", ["application/x-msgpack", "application/vnd.msgpack", "APPLICATION/MSGPACK"])
def test_msgpack_aliases(alias: str) -> None:
    assert codec.normalize_content_type(alias) == codec.MSGPACK
    assert codec.normalize_content_type(f"{alias}; charset=binary") == codec.MSGPACK
    assert codec.decode(codec.encode([1, "x"], alias), alias) == [1, "x"]
    assert codec.encode([1, "x"], alias) == msgpack.packb([1, "x"])


@pytest.mark.parametrize("content_type", ["application/json", " Application/JSON ; charset=utf-8"])
def test_json_content_types(content_type: str) -> None:
    assert codec.normalize_content_type(content_type) == codec.JSON
    assert codec.encode({"a": 1}, content_type) == b'{"a":1}'


@pytest.mark.parametrize("content_type", [None, "", "text/plain", "application/octet-stream", "json"])
def test_unknown_content_types_normalise_to_none(content_type: str | None) -> None:
    assert codec.normalize_content_type(content_type) is None


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"\xc1", codec.MSGPACK),
        (b"\x92\x01", codec.MSGPACK),
        (b"", codec.MSGPACK),
        (b"\x01\x02", codec.MSGPACK),
        (b"\xa1\xff", codec.MSGPACK),
        (b"\x91" * 100_000, codec.MSGPACK),
        (b"{", codec.JSON),
        (b"", codec.JSON),
        (b"\xff", codec.JSON),
        (b"[1] [2]", codec.JSON),
        (b"[" * 100_000, codec.JSON),
    ],
    ids=[
        "msgpack-reserved",
        "msgpack-truncated",
        "msgpack-empty",
        "msgpack-extra-data",
        "msgpack-bad-utf8",
        "msgpack-too-deep",
        "json-truncated",
        "json-empty",
        "json-bad-utf8",
        "json-extra-data",
        "json-too-deep",
    ],
)
def test_malformed_input_raises_protocol_error_keeping_the_bytes(data: bytes, content_type: str) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.decode(data, content_type)

    assert info.value.data == data
    assert str(info.value).startswith(f"malformed {content_type} body")
    assert isinstance(info.value, FabricError)
    assert isinstance(info.value, ValueError)


def test_unsupported_content_type_raises_protocol_error_keeping_the_bytes() -> None:
    with pytest.raises(ProtocolError, match="text/plain") as info:
        codec.decode(b"hello", "text/plain")

    assert info.value.data == b"hello"


class _Opaque:
    pass


@pytest.mark.parametrize("content_type", [codec.MSGPACK, codec.JSON])
@pytest.mark.parametrize(
    "value", [_Opaque(), {"nested": [object()]}, {1j}], ids=["object", "nested", "complex"]
)
def test_unencodable_value_raises_protocol_error(value: Any, content_type: str) -> None:
    with pytest.raises(ProtocolError, match=f"cannot encode value as {content_type}"):
        codec.encode(value, content_type)


def _nested(depth: int) -> list[Any]:
    root: list[Any] = []
    current = root
    for _ in range(depth):
        child: list[Any] = []
        current.append(child)
        current = child
    return root


@pytest.mark.parametrize("content_type", [codec.MSGPACK, codec.JSON])
def test_too_deeply_nested_value_raises_protocol_error(content_type: str) -> None:
    with pytest.raises(ProtocolError, match=f"cannot encode value as {content_type}"):
        codec.encode(_nested(100_000), content_type)


def test_integer_too_large_for_msgpack_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        codec.encode(2**64)


# --- headers ----------------------------------------------------------------------------------------------


def test_get_str() -> None:
    h = {"s": "text", "b": b"bytes", "ba": bytearray(b"arr"), "n": 7, "none": None, "bad": b"\xff"}

    assert headers.get_str(h, "s") == "text"
    assert headers.get_str(h, "b") == "bytes"
    assert headers.get_str(h, "ba") == "arr"
    assert headers.get_str(h, "n") == "7"
    assert headers.get_str(h, "none", "d") == "d"
    assert headers.get_str(h, "missing") == ""
    assert headers.get_str(None, "missing", "d") == "d"
    assert headers.get_str(h, "bad") == "\ufffd"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, 3), ("4", 4), (b"5", 5), ("2.0", 2), (b"7.9", 7), (0, 0), ("-1", -1)],
)
def test_get_int_reads_numbers(value: Any, expected: int) -> None:
    assert headers.get_int({"h": value}, "h", 99) == expected


@pytest.mark.parametrize("value", [None, "", b"", "abc", b"\xff", "1/2", "nan"])
def test_get_int_falls_back_on_missing_or_bad_numbers(value: Any) -> None:
    assert headers.get_int({"h": value}, "h", 99) == 99


@pytest.mark.parametrize(
    "value", ["inf", b"-inf", "1e999", float("inf")], ids=["inf", "bytes-inf", "1e999", "float"]
)
def test_get_int_falls_back_on_infinite_numbers(value: Any) -> None:
    """A header such as ``fabric-attempt: inf`` must not crash the worker that reads it."""
    assert headers.get_int({headers.ATTEMPT: value}, headers.ATTEMPT, 1) == 1


def test_get_int_missing_headers() -> None:
    assert headers.get_int(None, headers.ATTEMPT, 1) == 1
    assert headers.get_int({}, headers.ATTEMPT, 2) == 2


@pytest.mark.parametrize(
    ("value", "expected"), [(1.5, 1.5), ("2.25", 2.25), (b"30", 30.0), ("0", 0.0), (4, 4.0)]
)
def test_get_float_reads_numbers(value: Any, expected: float) -> None:
    assert headers.get_float({"h": value}, "h", None) == expected


@pytest.mark.parametrize("value", [None, "", b"", "soon", b"\xff"])
def test_get_float_falls_back_on_missing_or_bad_numbers(value: Any) -> None:
    assert headers.get_float({"h": value}, "h", None) is None
    assert headers.get_float({"h": value}, "h", 3.0) == 3.0


def test_get_list() -> None:
    h = {
        "list": [b"a", "b", 3],
        "tuple": (b"x",),
        "single": b"solo",
        "text": "one",
        "empty": [],
        "none": None,
    }

    assert headers.get_list(h, "list") == ["a", "b", "3"]
    assert headers.get_list(h, "tuple") == ["x"]
    assert headers.get_list(h, "single") == ["solo"]
    assert headers.get_list(h, "text") == ["one"]
    assert headers.get_list(h, "empty") == []
    assert headers.get_list(h, "none") == []
    assert headers.get_list(h, "missing") == []
    assert headers.get_list(None, "missing") == []


def test_get_list_tolerates_bad_utf8_like_get_str() -> None:
    """``get_str`` replaces undecodable bytes; the items of an array header must not raise instead."""
    assert headers.get_list({headers.AVOID: [b"\xff", b"ok"]}, headers.AVOID) == ["\ufffd", "ok"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("TRUE", True),
        (b"1", True),
        ("yes", True),
        ("false", False),
        ("0", False),
        ("", False),
        (None, False),
        (b"\xff", False),
        (2, False),
    ],
)
def test_get_bool_reads_flags(value: Any, expected: bool) -> None:
    assert headers.get_bool({headers.NOTIFY_TASKS: value}, headers.NOTIFY_TASKS) is expected


def test_get_bool_missing_headers() -> None:
    assert headers.get_bool(None, headers.NOTIFY_TASKS) is False
    assert headers.get_bool({}, headers.NOTIFY_TASKS) is False
