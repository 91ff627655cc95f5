"""/metrics, /healthz and /readyz for every role (aiohttp, already a ccxt dependency)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


async def start_http(
    host: str,
    port: int,
    readiness: Callable[[], Awaitable[dict[str, bool]]],
    details: Callable[[], dict[str, Any]] | None = None,
) -> web.AppRunner:
    """`readiness` decides the status; `details` are shown beside it and decide nothing (a
    stale price feed is worth seeing, not worth taking a worker out of service for)."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        checks = await readiness()
        ready = all(checks.values())
        body: dict[str, Any] = {"ready": ready, "checks": checks}
        if details is not None:
            body["details"] = details()
        return web.json_response(body, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
