"""The HTTP API application: ingest routes, API-key auth, request metrics, health, OpenAPI; and its runner.

`create_app(settings)` builds the aiohttp app; other parts (the settings API) add their routes to it before it
starts. `run_api(settings, host, port)` serves it until SIGINT/SIGTERM (or `stop`), then shuts down gracefully:
stop accepting, let in-flight requests finish, flush the producer.
Metrics go to prometheus-client's default registry, served at /metrics (no key needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline import console, metrics
from pipeline.api import auth, ingest, notifications, user_settings, webhooks
from pipeline.api.openapi import openapi_document
from pipeline.config import Settings
from pipeline.kafka.upstream import FLUSH_TIMEOUT_S, NotificationProducer
from pipeline.policy import templates
from pipeline.process import health
from pipeline.state import db

log = logging.getLogger(__name__)

DEFAULT_HOST: Final = "127.0.0.1"
# In-flight requests may wait up to the producer's delivery timeout (10 s) plus its grace; give them that.
SHUTDOWN_TIMEOUT_S: Final = 20.0
_METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})

REQUESTS = metrics.counter("notify_api_requests_total", "HTTP requests by route, method and status.",
                   ["route", "method", "status"])
REQUEST_SECONDS = metrics.histogram("notify_api_request_seconds", "HTTP request duration by route and method.",
                            ["route", "method"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20))


def _route_label(request: web.Request) -> str:
    # The route template, never the raw path: labels stay bounded whatever clients send.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: auth.Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error"}, status=500)
    finally:
        route, method = _route_label(request), request.method if request.method in _METHODS else "other"
        REQUESTS.labels(route, method, str(status)).inc()
        REQUEST_SECONDS.labels(route, method).observe(time.perf_counter() - started)


async def live(_request: web.Request) -> web.Response:
    return web.json_response({**health.LIVE_BODY, "process": "api"})


def _ready_route(readiness: health.Readiness) -> auth.Handler:
    async def ready(_request: web.Request) -> web.Response:
        status, body = await asyncio.to_thread(readiness.report)  # blocking clients: off the event loop
        return web.json_response({**body, "process": "api"}, status=status)

    return ready


async def serve_metrics(_request: web.Request) -> web.Response:
    body = generate_latest()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_json(_request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def create_app(settings: Settings, *, producer: NotificationProducer | None = None,
               key_cache_ttl_s: float = auth.KEY_CACHE_TTL_S,
               outbox: user_settings.SettingsOutbox | None = None) -> web.Application:
    """The API app. Without `producer`, one is created when the app starts and flushed and closed when it stops;
    a given producer belongs to the caller (not closed here). `outbox` publishes settings writes (default: one
    on `settings`)."""
    app = web.Application(client_max_size=ingest.MAX_BODY_BYTES, middlewares=[metrics_middleware])
    auth.setup(app, settings, cache_ttl_s=key_cache_ttl_s)
    ingest.setup(app, settings)
    notifications.setup(app, settings)
    user_settings.setup(app, settings, outbox)
    webhooks.setup(app, settings)
    console.setup(app, settings)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", _ready_route(health.Readiness(settings)))
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/metrics", serve_metrics)

    async def producer_lifecycle(app: web.Application) -> AsyncIterator[None]:
        state = app[ingest.INGEST]
        state.producer = producer or NotificationProducer(settings)
        yield
        owned, state.producer = state.producer, None  # new requests get 503 from here on
        if producer is None:
            remaining = await owned.aclose(FLUSH_TIMEOUT_S)
            log.info("ingest producer closed; %d request(s) left unflushed", remaining)

    app.cleanup_ctx.append(producer_lifecycle)
    return app


async def run_api(settings: Settings, host: str = DEFAULT_HOST, port: int | None = None, *,
                  app: web.Application | None = None, stop: asyncio.Event | None = None,
                  shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Serve `app` (default: create_app(settings)) on host:port (default settings.api_port) until SIGINT/SIGTERM
    or `stop` is set."""
    templates.validate(settings.templates_dir)  # fail fast: an invalid templates/ would refuse every request
    app = app if app is not None else create_app(settings)
    port = settings.api_port if port is None else port
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread, Windows
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout_s, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("API listening on http://%s:%d", host, port)
        await stop.wait()
        log.info("API stopping: no new connections, finishing in-flight requests")
    finally:
        # Closes the listening socket, waits for in-flight requests (bounded), then runs the cleanup contexts
        # (the producer flush). The signal handlers stay until then: a second Ctrl-C or the supervisor's
        # SIGTERM must not interrupt the flush.
        try:
            await runner.cleanup()
            await db.close_async_pools()
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
