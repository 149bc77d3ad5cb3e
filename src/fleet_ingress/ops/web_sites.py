"""Where the operators' web apps are served: stats on TCP, admin on its Unix socket.

The in-process ingress and the supervisor serve the same two apps the same
way; each keeps one `WebSites` and closes it when it stops.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


class WebSites:
    """The runners of the web apps a service serves, cleaned up together."""

    def __init__(self) -> None:
        self._runners: list[web.AppRunner] = []

    async def serve(
        self, app: web.Application, site_type: type[web.BaseSite], **where: Any
    ) -> web.AppRunner:
        """Serve `app` on a TCP or Unix site (`where`: host/port or sock). No
        access log, no signal handlers: the service owns both."""
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await site_type(runner, **where).start()
        self._runners.append(runner)
        return runner

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
