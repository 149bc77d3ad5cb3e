"""Answers the ingress gives itself (health, refusals, give-ups). No I/O.

Each is a complete HTTP/1.1 response with a short text body and
`Connection: close`: every local answer ends its connection.
"""

from __future__ import annotations

from http import HTTPStatus


def local_response(status: int, text: str, *, head_only: bool = False) -> bytes:
    body = text.encode("utf-8")
    reason = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")
    return head if head_only else head + body
