"""Reading a fleet's answer (no sockets): where the head and body end."""

import pytest

from fleet_ingress.core.fleet_exchange import FleetExchange, Progress, ResponseError

HEADERS = [(b"Host", b"f"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]


def _exchange():
    return FleetExchange(b"GET", b"/ws/x", HEADERS, max_head_bytes=4096)


def test_101_completes_the_head_and_switches():
    ex = _exchange()
    assert (
        ex.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n") is Progress.NEED_DATA
    )
    assert ex.feed(b"Connection: Upgrade\r\n\r\n\x81\x02hi") is Progress.HEAD_COMPLETE
    assert ex.head is not None and ex.head.switched and ex.head.status == 101


def test_100_continue_before_101_is_skipped():
    ex = _exchange()
    assert (
        ex.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 OK\r\n\r\n") is Progress.HEAD_COMPLETE
    )
    assert ex.head is not None and ex.head.status == 101


def test_429_with_content_length_body():
    ex = _exchange()
    assert ex.feed(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 4\r\n\r\nab") is (
        Progress.HEAD_COMPLETE
    )
    assert ex.head is not None and (ex.head.status, ex.head.switched) == (429, False)
    assert ex.advance() is Progress.NEED_DATA
    assert ex.feed(b"cd") is Progress.BODY_COMPLETE


def test_body_in_the_same_read_as_the_head_is_seen_by_advance():
    ex = _exchange()
    assert (
        ex.feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno") is Progress.HEAD_COMPLETE
    )
    assert ex.advance() is Progress.BODY_COMPLETE


def test_body_until_close():
    ex = _exchange()
    assert ex.feed(b"HTTP/1.1 503 Unavailable\r\n\r\nsome") is Progress.HEAD_COMPLETE
    assert ex.advance() is Progress.NEED_DATA
    assert ex.feed_eof() is Progress.BODY_COMPLETE


def test_chunked_body():
    ex = _exchange()
    ex.feed(b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert ex.feed(b"3\r\nabc\r\n") is Progress.NEED_DATA
    assert ex.feed(b"0\r\n\r\n") is Progress.BODY_COMPLETE


@pytest.mark.parametrize("partial", [b"", b"HTTP/1.1 101 Swi", b"HTTP/1.1 200 OK\r\nX: y\r\n"])
def test_close_before_a_complete_head_is_an_empty_response(partial):
    ex = _exchange()
    if partial:
        assert ex.feed(partial) is Progress.NEED_DATA
    with pytest.raises(ResponseError) as info:
        ex.feed_eof()
    assert info.value.kind == "empty-response"


@pytest.mark.parametrize(
    "junk", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n", b"\x16\x03\x01\x00\xa5\r\n\r\n"]
)
def test_junk_is_a_junk_response(junk):
    with pytest.raises(ResponseError) as info:
        _exchange().feed(junk)
    assert info.value.kind == "junk-response"


def test_a_response_head_over_the_limit_is_junk():
    ex = _exchange()
    with pytest.raises(ResponseError) as info:
        ex.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 5000)
    assert info.value.kind == "junk-response"


def test_an_answer_arriving_byte_by_byte_has_its_head_bytes():
    ex = _exchange()
    answer = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    for i in range(len(answer) - 1):
        assert ex.feed(answer[i : i + 1]) is Progress.NEED_DATA
    assert ex.feed(answer[-1:]) is Progress.HEAD_COMPLETE
    assert ex.head_bytes == len(answer)


@pytest.mark.parametrize(
    "heads, rest",
    [
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", b"\x81\x02hi"),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Slow\r\nContent-Length: 4\r\n\r\n", b"ab"),
        (b"HTTP/1.1 200 OK\r\n\r\n", b""),
    ],
)
def test_head_bytes_is_where_what_follows_the_answers_heads_begins(heads, rest):
    ex = _exchange()
    assert ex.feed(heads + rest) is Progress.HEAD_COMPLETE
    assert ex.head_bytes == len(heads)
