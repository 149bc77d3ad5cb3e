"""Answers the ingress gives itself (health, refusals, give-ups). No I/O.

Each is a complete HTTP/1.1 response with a short text body and
`Connection: close`: every local answer ends its connection.
"""

from __future__ import annotations

from http import HTTPStatus


def local_response(
    status: int, text: str, *, head_only: bool = False, allow: str | None = None
) -> bytes:
    """`allow`: a 405's Allow header (RFC 9110 15.5.6: the methods the target takes)."""
    body = text.encode("utf-8")
    reason = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        + (f"Allow: {allow}\r\n" if allow is not None else "")
        + "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")
    return head if head_only else head + body
