"""Where the operators' web apps are served: stats on TCP, admin on its Unix socket.

The in-process ingress and the supervisor serve the same two apps the same
way; each keeps one `WebSites` and closes it when it stops.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from fleet_ingress.logs import fields

log = logging.getLogger("fleet_ingress.server")


class WebSites:
    """The runners of the web apps a service serves, cleaned up together."""

    def __init__(self) -> None:
        self._runners: list[web.AppRunner] = []

    async def serve(
        self, app: web.Application, site_type: type[web.BaseSite], **where: Any
    ) -> web.AppRunner:
        """Serve `app` on a TCP or Unix site (`where`: host/port or sock). No
        access log, no signal handlers: the service owns both. When the site
        cannot start (its address in use...) the runner is cleaned up and
        that error raised."""
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await site_type(runner, **where).start()
        except BaseException as exc:
            try:
                await runner.cleanup()
            except Exception as cleanup:
                # The site's error is the one to raise: it names what to fix.
                log.warning(
                    "web app cleanup failed after its site could not start",
                    extra=fields(error=repr(cleanup), site_error=repr(exc)),
                )
            raise
        self._runners.append(runner)
        return runner

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
