"""Framing of Postfix lookup requests: netstrings (socketmap_table(5)) and tcp_table(5) lines.

Every row is one rule of the decoder's contract: what a request becomes, when it is an
error, and that an error never costs the following well-formed request its answer.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxguard.postfix.netstring import (
    LineDecoder,
    Malformed,
    NetstringDecoder,
    PercentError,
    Request,
    encode,
    pct_decode,
    pct_encode,
)

NEXT = encode(b"postfix next.test")  # a well-formed request after the case under test


def kinds(events: list[Request | Malformed]) -> list[str]:
    out = []
    for e in events:
        if isinstance(e, Request):
            out.append(f"request:{e.payload.decode()}")
        else:
            out.append("fatal" if e.fatal else "too-long" if e.too_long else "malformed")
    return out


@pytest.mark.parametrize(
    ("rule", "data", "expected"),
    [
        ("length, colon, payload, comma", b"11:postfix a.b,", ["request:postfix a.b"]),
        ("an empty payload is a request", b"0:,", ["request:"]),
        ("pipelined requests come out in order", b"3:abc,3:def,", ["request:abc", "request:def"]),
        ("a non-digit length is malformed", b"abc,", ["malformed"]),
        ("a comma where the length belongs is malformed", b",", ["malformed"]),
        ("a colon without a length is malformed", b":abc,", ["malformed"]),
        ("a missing comma after the payload is malformed", b"3:abcX,", ["malformed"]),
        ("a length with more than 10 digits is malformed", b"12345678901:x,", ["malformed"]),
        ("a request over 4096 bytes is too long", b"5000:" + b"x" * 5000 + b",", ["too-long"]),
        ("a too-long request without its comma is answered once", b"4097:" + b"x" * 4097 + b"Z,",
         ["too-long"]),
    ],
)  # fmt: skip
def test_netstring_rows_and_the_next_request_still_gets_through(
    rule: str, data: bytes, expected: list[str]
) -> None:
    decoder = NetstringDecoder()
    assert kinds(decoder.feed(data + NEXT)) == [*expected, "request:postfix next.test"], rule


def test_netstring_decodes_byte_by_byte_like_all_at_once() -> None:
    stream = b"3:abc,xx,0:,5000:" + b"y" * 5000 + b",4:abcd,"
    whole = kinds(NetstringDecoder().feed(stream))
    decoder = NetstringDecoder()
    split = [k for i in range(len(stream)) for k in kinds(decoder.feed(stream[i : i + 1]))]
    assert split == whole == ["request:abc", "malformed", "request:", "too-long", "request:abcd"]


def test_garbage_without_a_comma_loses_the_framing_after_one_reply() -> None:
    decoder = NetstringDecoder(max_skip=100)
    events = decoder.feed(b"x" + b"y" * 200)
    assert kinds(events) == ["malformed", "fatal"]
    assert decoder.dead
    assert decoder.feed(NEXT) == []


def test_encode_round_trips() -> None:
    assert encode(b"OK dane-only") == b"12:OK dane-only,"
    assert NetstringDecoder().feed(encode(b"NOTFOUND ")) == [Request(b"NOTFOUND ")]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=8))
def test_arbitrary_bytes_never_raise_and_never_buffer_past_the_bound(chunks: list[bytes]) -> None:
    decoder = NetstringDecoder(max_request=1000)
    for chunk in chunks:
        for event in decoder.feed(chunk):
            assert isinstance(event, Request | Malformed)
            if isinstance(event, Request):
                assert len(event.payload) <= 1000
        assert decoder.buffered <= 1000 + 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_any_payload_survives_a_round_trip(payloads: list[bytes]) -> None:
    stream = b"".join(encode(p) for p in payloads)
    assert NetstringDecoder().feed(stream) == [Request(p) for p in payloads]


# --- tcp_table -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "data", "expected"),
    [
        ("a request is one LF-terminated line", b"get a.test\n", ["request:get a.test"]),
        ("a CR before the LF is dropped", b"get a.test\r\n", ["request:get a.test"]),
        ("pipelined lines in order", b"get a\nget b\n", ["request:get a", "request:get b"]),
        ("a line over the bound is too long, once", b"get " + b"x" * 5000 + b"\n", ["too-long"]),
    ],
)  # fmt: skip
def test_tcp_table_lines(rule: str, data: bytes, expected: list[str]) -> None:
    assert kinds(LineDecoder().feed(data + b"get next\n")) == [*expected, "request:get next"], rule


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=8))
def test_tcp_table_arbitrary_bytes_stay_bounded(chunks: list[bytes]) -> None:
    decoder = LineDecoder(max_request=1000)
    for chunk in chunks:
        for event in decoder.feed(chunk):
            assert isinstance(event, Request | Malformed)
        assert decoder.buffered <= 1000


@pytest.mark.parametrize(
    ("plain", "encoded"),
    [
        (b"example.test", b"example.test"),
        (b"secure match=.a.test servername=x", b"secure%20match=.a.test%20servername=x"),
        (b"100%", b"100%25"),
        ("b\u00fccher.test".encode(), b"b%C3%BCcher.test"),
        (b"a\nb", b"a%0Ab"),
    ],
)  # fmt: skip
def test_percent_encoding_of_tcp_table(plain: bytes, encoded: bytes) -> None:
    assert pct_encode(plain) == encoded
    assert pct_decode(encoded) == plain


@pytest.mark.parametrize("bad", [b"%", b"%4", b"%zz", b"a%g1"])
def test_percent_without_two_hex_digits_is_an_error(bad: bytes) -> None:
    with pytest.raises(PercentError):
        pct_decode(bad)


netstring_parts = st.one_of(
    st.binary(max_size=40).map(encode),  # whole netstrings: the decoder's fast path
    st.binary(max_size=12),  # anything: framing errors, split lengths, stray commas
    st.sampled_from([b"0:,", b"12345678901:x,", b"5:abc", b",", b":", b"4097:"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(netstring_parts, max_size=12), st.integers(min_value=1, max_value=7))
def test_the_whole_netstring_fast_path_decodes_like_the_byte_by_byte_states(
    parts: list[bytes], step: int
) -> None:
    # feed() takes whole netstrings in one slice; anything else goes byte by byte through
    # the states. Fed at once or in small pieces, the events must be the same.
    stream = b"".join(parts)
    whole = NetstringDecoder(max_request=30).feed(stream)
    decoder = NetstringDecoder(max_request=30)
    pieces = [e for i in range(0, len(stream), step) for e in decoder.feed(stream[i : i + step])]
    assert pieces == whole


@settings(max_examples=300, deadline=None)
@given(st.lists(netstring_parts, max_size=6), st.lists(netstring_parts, max_size=3))
def test_a_read_taken_whole_is_the_one_request_feed_would_give(
    before: list[bytes], parts: list[bytes]
) -> None:
    # The server's hot path asks whole() first and gives feed() only what it declines:
    # whatever came before, a payload whole() returns is exactly what feed() would decode.
    decoder = NetstringDecoder(max_request=30)
    decoder.feed(b"".join(before))
    data = b"".join(parts)
    payload = decoder.whole(data)
    if payload is not None:
        assert decoder.feed(data) == [Request(payload)]


@pytest.mark.parametrize(
    ("rule", "before", "data", "expected"),
    [
        ("one whole netstring", b"", b"11:postfix a.b,", b"postfix a.b"),
        ("an empty payload", b"", b"0:,", b""),
        ("leading zeros in the length, as feed() reads them", b"", b"03:abc,", b"abc"),
        ("two netstrings are for feed()", b"", b"3:abc,3:def,", None),
        ("a length that is not the payload's", b"", b"4:abc,", None),
        ("no comma at the end", b"", b"3:abcX", None),
        ("over max_request", b"", b"5000:" + b"x" * 5000 + b",", None),
        ("part of a request held from the read before", b"1", b"1:postfix a.b,", None),
        ("a request's start held from before", b"5:ab", b"3:abc,", None),
    ],
)  # fmt: skip
def test_whole_takes_only_a_lone_netstring_on_a_clean_decoder(
    rule: str, before: bytes, data: bytes, expected: bytes | None
) -> None:
    decoder = NetstringDecoder()
    decoder.feed(before)
    assert decoder.whole(data) == expected, rule
