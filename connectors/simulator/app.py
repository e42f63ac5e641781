"""The provider simulator app: every provider under its path prefix, plus the admin API.

    /twilio/2010-04-01/...   /termii/api/...   /sendgrid/v3/...   /mailgun/v3/...
    /fcm/token (Google OAuth2 for the service account)   /fcm/v1/projects/{project}/messages:send

APNs speaks only HTTP/2, which aiohttp does not serve: `ApnsServer` (connectors.simulator.apns) answers
POST /3/device/{token} on a port of its own (NOTIFY_SIMULATOR_APNS_PORT), sharing this app's state (ledger,
faults, stats). `run_simulator` starts both; tests start both on free ports (tests/support/provider_sim.py).

Admin (JSON):
    GET  /_admin/ledger?provider=&notification_id=&to=&provider_message_id=   accepted messages, oldest first
    GET  /_admin/ledger/summary            counts, and the notifications accepted more than once per recipient
    GET  /_admin/test-sends?provider=      messages accepted in a provider's test mode (shadow traffic)
    GET  /_admin/providers                 the fault settings of every provider
    POST /_admin/providers/{name}          change some fault settings (see connectors.simulator.state)
    POST /_admin/reset                     empty the ledger and counters, faults back to their defaults
    GET  /_admin/stats                     answers per provider and HTTP status, plus accepted counts (FCM's
                                           OAuth2 token answers as token_<status>)
    GET  /_admin/health
    POST /_sink/{provider}                 a receipt sink (NOTIFY_WEBHOOK_BASE_URL=<simulator>/_sink) for runs
                                           without a webhook receiver
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from connectors.simulator import fcm, mailgun, sendgrid, termii, twilio
from connectors.simulator.apns import ApnsServer
from connectors.simulator.common import SIM, Simulator, json_response, sim_of
from connectors.simulator.state import PROVIDERS, FaultConfigError, SimulatorState
from pipeline.config import Settings
from pipeline.process import aio

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_UNSET: Any = object()


@web.middleware
async def count_answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every provider answer by provider and HTTP status (GET /_admin/stats)."""
    response = await handler(request)
    provider = request.path.split("/", 2)[1]
    if provider in PROVIDERS:
        token = request.path == f"/{provider}/token"  # an OAuth2 token request, not a send
        sim_of(request).state.count(provider, f"token_{response.status}" if token else str(response.status))
    return response


async def ledger(request: web.Request) -> web.Response:
    filters = {key: request.query.get(key) for key in ("provider", "notification_id", "to", "provider_message_id")}
    entries = sim_of(request).state.query(**filters)
    return json_response(200, {"count": len(entries), "entries": [e.public() for e in entries]})


async def ledger_summary(request: web.Request) -> web.Response:
    """Counts of the ledger and the notifications in it more than once per recipient (for large runs, where the
    ledger itself is too long to fetch)."""
    return json_response(200, sim_of(request).state.summary())


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
        out.setdefault(provider, {})[what] = count  # "sink": receipts the sink took, per provider
    return json_response(200, out)


async def sink(request: web.Request) -> web.Response:
    """A receipt sink: runs without a webhook receiver (the sender's tests and benchmark) point receipts here, so
    Twilio messages still carry their StatusCallback (our reference) and callbacks do not fail."""
    await request.read()
    sim_of(request).state.count("sink", request.match_info["provider"])
    return web.Response(status=204)


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
        # Twilio's receipts go to each message's StatusCallback; FCM and APNs have none.
        webhook_urls={p: f"{base.rstrip('/')}/{p}" if base else None for p in PROVIDERS
                      if p not in ("twilio", "fcm", "apns")},
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
    for provider in (twilio, termii, sendgrid, mailgun, fcm):
        provider.add_routes(app)
    app.router.add_get("/_admin/ledger", ledger)
    app.router.add_get("/_admin/ledger/summary", ledger_summary)
    app.router.add_get("/_admin/test-sends", test_sends)
    app.router.add_get("/_admin/providers", providers)
    app.router.add_post("/_admin/providers/{name}", configure)
    app.router.add_post("/_admin/reset", reset)
    app.router.add_get("/_admin/stats", stats)
    app.router.add_get("/_admin/health", health)
    app.router.add_post("/_sink/{provider}", sink)
    return app


async def run_simulator(settings: Settings, host: str = "127.0.0.1", port: int | None = None,
                        ready: asyncio.Event | None = None, apns_port: int | None = None) -> None:
    """Serve the simulator (HTTP/1.1 on `port`, APNs' HTTP/2 on `apns_port`) until cancelled."""
    app = create_simulator_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    apns = ApnsServer(app[SIM])
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, settings.simulator_port if port is None else port)
        await site.start()
        await apns.start(host, settings.simulator_apns_port if apns_port is None else apns_port)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await apns.close()
        await runner.cleanup()


def run_simulator_cli(settings: Settings, host: str = "127.0.0.1", port: int | None = None) -> int:
    """`notify simulator`: serve in the foreground until Ctrl-C; 0 on a clean stop, 1 when the port is taken."""
    port = settings.simulator_port if port is None else port
    print(f"provider simulator on http://{host}:{port} (/twilio /termii /sendgrid /mailgun /fcm, admin "
          f"/_admin/ledger), APNs (HTTP/2) on http://{host}:{settings.simulator_apns_port}; "
          f"receipts to {settings.webhook_base_url or 'nowhere (NOTIFY_WEBHOOK_BASE_URL unset)'}", flush=True)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            aio.run(run_simulator(settings, host, port))
    except OSError as exc:
        print(f"simulator: cannot listen on {host}:{port} or :{settings.simulator_apns_port}: {exc}",
              file=sys.stderr)
        return 1
    return 0
