"""The provider simulator app: every provider under its path prefix, plus the admin API.

    /twilio/2010-04-01/...   /termii/api/...   /sendgrid/v3/...   /mailgun/v3/...

Admin (JSON):
    GET  /_admin/ledger?provider=&notification_id=&to=&provider_message_id=   accepted messages, oldest first
    GET  /_admin/test-sends?provider=      messages accepted in a provider's test mode (shadow traffic)
    GET  /_admin/providers                 the fault settings of every provider
    POST /_admin/providers/{name}          change some fault settings (see connectors.simulator.state)
    POST /_admin/reset                     empty the ledger and counters, faults back to their defaults
    GET  /_admin/stats                     answers per provider and HTTP status, plus accepted counts
    GET  /_admin/health
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from connectors.simulator import mailgun, sendgrid, termii, twilio
from connectors.simulator.common import SIM, Simulator, json_response, sim_of
from connectors.simulator.state import PROVIDERS, FaultConfigError, SimulatorState
from pipeline.config import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_UNSET: Any = object()


@web.middleware
async def count_answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every provider answer by provider and HTTP status (GET /_admin/stats)."""
    response = await handler(request)
    provider = request.path.split("/", 2)[1]
    if provider in PROVIDERS:
        sim_of(request).state.count(provider, str(response.status))
    return response


async def ledger(request: web.Request) -> web.Response:
    filters = {key: request.query.get(key) for key in ("provider", "notification_id", "to", "provider_message_id")}
    entries = sim_of(request).state.query(**filters)
    return json_response(200, {"count": len(entries), "entries": [e.public() for e in entries]})


async def test_sends(request: web.Request) -> web.Response:
    """Messages accepted in a provider's test mode (shadow traffic): answered, never delivered."""
    provider = request.query.get("provider")
    entries = [e for e in sim_of(request).state.test_sends if provider is None or e.provider == provider]
    return json_response(200, {"count": len(entries), "entries": [e.public() for e in entries]})


async def providers(request: web.Request) -> web.Response:
    state = sim_of(request).state
    return json_response(200, {name: cfg.public() for name, cfg in state.faults.items()})


async def configure(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    state = sim_of(request).state
    if name not in state.faults:
        return json_response(404, {"error": f"unknown provider {name!r}; known: {list(PROVIDERS)}"})
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise FaultConfigError("the body must be a JSON object")
        cfg = state.configure(name, changes)
    except (ValueError, FaultConfigError) as exc:
        return json_response(400, {"error": str(exc)})
    return json_response(200, cfg.public())


async def reset(request: web.Request) -> web.Response:
    sim_of(request).state.reset()
    return json_response(200, {"reset": True})


async def stats(request: web.Request) -> web.Response:
    out: dict[str, dict[str, int]] = {p: {} for p in PROVIDERS}
    for (provider, what), count in sorted(sim_of(request).state.counters.items()):
        out[provider][what] = count
    return json_response(200, out)


async def health(_request: web.Request) -> web.Response:
    return json_response(200, {"ok": True})


def create_simulator_app(settings: Settings, *, webhook_base_url: str | None = _UNSET,
                         delivery_delay_ms: float | None = None, seed: int | None = None,
                         max_hang_s: float = 300.0) -> web.Application:
    """The simulator, accepting the credentials of `settings`.

    Receipts of Termii, SendGrid and Mailgun go to <webhook_base_url>/<provider> (default: NOTIFY_WEBHOOK_BASE_URL;
    None: no callbacks); Twilio's go to each message's StatusCallback. Messages count as delivered
    `delivery_delay_ms` after acceptance (default NOTIFY_SIMULATOR_DELIVERY_DELAY_MS).
    """
    base = settings.webhook_base_url if webhook_base_url is _UNSET else webhook_base_url
    state = SimulatorState(
        delivery_delay_ms=settings.simulator_delivery_delay_ms if delivery_delay_ms is None else delivery_delay_ms,
        webhook_urls={p: f"{base.rstrip('/')}/{p}" if base else None for p in PROVIDERS if p != "twilio"},
        seed=seed, max_hang_s=max_hang_s,
    )
    app = web.Application(middlewares=[count_answers])
    app[SIM] = Simulator(settings=settings, state=state)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        yield
        await app[SIM].close()

    async def release_hung(app: web.Application) -> None:
        app[SIM].state.stopping.set()  # hung handlers answer, so shutdown does not wait for them

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(release_hung)
    for provider in (twilio, termii, sendgrid, mailgun):
        provider.add_routes(app)
    app.router.add_get("/_admin/ledger", ledger)
    app.router.add_get("/_admin/test-sends", test_sends)
    app.router.add_get("/_admin/providers", providers)
    app.router.add_post("/_admin/providers/{name}", configure)
    app.router.add_post("/_admin/reset", reset)
    app.router.add_get("/_admin/stats", stats)
    app.router.add_get("/_admin/health", health)
    return app


async def run_simulator(settings: Settings, host: str = "127.0.0.1", port: int | None = None,
                        ready: asyncio.Event | None = None) -> None:
    """Serve the simulator until cancelled."""
    runner = web.AppRunner(create_simulator_app(settings), access_log=None, shutdown_timeout=2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, settings.simulator_port if port is None else port)
        await site.start()
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run_simulator_cli(settings: Settings, host: str = "127.0.0.1", port: int | None = None) -> int:
    """`notify simulator`: serve in the foreground until Ctrl-C; 0 on a clean stop, 1 when the port is taken."""
    port = settings.simulator_port if port is None else port
    print(f"provider simulator on http://{host}:{port} (/twilio /termii /sendgrid /mailgun, admin /_admin/ledger); "
          f"receipts to {settings.webhook_base_url or 'nowhere (NOTIFY_WEBHOOK_BASE_URL unset)'}", flush=True)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_simulator(settings, host, port))
    except OSError as exc:
        print(f"simulator: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    return 0
