"""`ops.web_sites.WebSites`: the operators' web apps served on real sockets."""

from __future__ import annotations

import errno
import socket

import pytest
from aiohttp import web

from fleet_ingress.ops.web_sites import WebSites


async def test_a_site_that_cannot_start_is_cleaned_up_and_its_error_raised() -> None:
    """The stats port is taken (another process listens on it): `serve` must
    raise that error, not another, and not leave the runner it had set up
    (the app's cleanup never run, its resources held until exit)."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cleaned: list[str] = []

    async def on_cleanup(app: web.Application) -> None:
        cleaned.append("cleanup")

    app = web.Application()
    app.on_cleanup.append(on_cleanup)
    sites = WebSites()
    try:
        with pytest.raises(OSError) as raised:
            await sites.serve(app, web.TCPSite, host="127.0.0.1", port=port)
        assert raised.value.errno == errno.EADDRINUSE
        assert cleaned == ["cleanup"]
        # The sites that did start are the ones closed, and the port is served
        # once it is free.
        taken.close()
        runner = await sites.serve(web.Application(), web.TCPSite, host="127.0.0.1", port=port)
        assert [s.name for s in runner.sites] == [f"http://127.0.0.1:{port}"]
    finally:
        taken.close()
        await sites.close()
    assert cleaned == ["cleanup"]
