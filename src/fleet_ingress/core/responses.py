"""Answers the ingress gives itself (health, refusals, give-ups). No I/O.

Each is a complete HTTP/1.1 response with a short text body and
`Connection: close`: every local answer ends its connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus


def local_response(
    status: int,
    text: str,
    *,
    head_only: bool = False,
    allow: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """`allow`: a 405's Allow header (RFC 9110 15.5.6: the methods the target takes);
    `headers`: others, ours (a 426's Upgrade and Sec-WebSocket-Version), never a
    carrier's. One with Upgrade says so in Connection too (RFC 9110 7.8)."""
    body = text.encode("utf-8")
    reason = HTTPStatus(status).phrase
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    upgrade = any(name.lower() == "upgrade" for name, _ in headers)
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        + (f"Allow: {allow}\r\n" if allow is not None else "")
        + extra
        + "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("Connection: upgrade, close\r\n" if upgrade else "Connection: close\r\n")
        + "\r\n"
    ).encode("ascii")
    return head if head_only else head + body
