"""Which route a request path takes on the carrier listener. Path only, no I/O.

The query string never takes part in routing (it is forwarded unchanged).
Short POST routes such as /attach or /livekit/* are not listed anywhere: they
use app-level fleet selection, and anything unlisted is a 404.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class RouteKind(enum.Enum):
    CALL = "call"  # proxied to a fleet
    HEALTH = "health"  # answered locally: 200 ok
    NOT_FOUND = "not_found"


# Not changed once made (nothing assigns to it), hashed by its fields as a frozen
# one was, but not frozen: a frozen dataclass sets each field by
# `object.__setattr__`, 5.9k instructions a call's route where this one's
# `__init__` is 2.0k (callgrind, session 50).
@dataclass(slots=True, unsafe_hash=True)
class Route:
    kind: RouteKind
    prefix: str = ""  # the matched call prefix, e.g. "/ws/"
    bot_id: str = ""  # what follows the prefix

    @property
    def label(self) -> str:
        """A bounded label for metrics and logs (never the bot id)."""
        return self.prefix or self.kind.value


NOT_FOUND = Route(RouteKind.NOT_FOUND)
HEALTH = Route(RouteKind.HEALTH)
# Read once a call: CPython 3.11 reads a member through its class by EnumType's
# __getattr__ slot (~900 instructions), a module's global by a dict lookup.
_CALL = RouteKind.CALL


class Router:
    def __init__(self, call_prefixes: Sequence[str], health_path: str) -> None:
        # Longest prefix first, so "/ws/v2/" can be configured beside "/ws/".
        self._prefixes = sorted(call_prefixes, key=len, reverse=True)
        self._health = health_path

    def route(self, path: str) -> Route:
        if path == self._health:
            return HEALTH
        for prefix in self._prefixes:
            if path.startswith(prefix):
                bot_id = path[len(prefix) :]
                # "/ws/" alone names no bot: nothing to route.
                return Route(_CALL, prefix, bot_id) if bot_id else NOT_FOUND
        return NOT_FOUND
