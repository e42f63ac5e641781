"""The ops console: server-rendered pages under /console, served by the API process (Jinja2, autoescaped; plain HTML
and CSS, no JavaScript).

Who may use it: a key with the `admin` scope, either logged in through /console/login (a session cookie: signed,
HttpOnly, SameSite=Strict, Secure over HTTPS; pipeline/console/session.py) or presented on each request as
`Authorization: Bearer <key>`. Every form carries a CSRF token tied to the session; a post without the right one
is refused with 403. Pages: pipeline, providers, DLQ, quarantine, notifications (the delivery log's timeline),
replay planner (pipeline/console/views.py). Redrives go through the same functions as `notify dlq|invalid
redrive`, with a dry run first and a confirmation step.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jinja2
from aiohttp import web

from pipeline.api import auth
from pipeline.config import Settings
from pipeline.console import sources, views

PREFIX = "/console"
TEMPLATES = Path(__file__).resolve().parent / "templates"


def setup(app: web.Application, settings: Settings) -> None:
    """Add the console's routes to the API app (call after auth.setup: the console authenticates itself)."""
    secret = (settings.console_secret or secrets.token_urlsafe(32)).encode()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    app[views.CONSOLE] = views.ConsoleState(settings, secret, env, sources.PipelineFigures())
    app[auth.PUBLIC_PREFIXES].add(PREFIX)
    for method, path, handler in views.ROUTES:
        app.router.add_route(method, PREFIX + path, handler)

    async def http_client(app: web.Application) -> AsyncIterator[None]:
        client = app[views.CONSOLE].http = aiohttp.ClientSession()
        yield
        await client.close()

    app.cleanup_ctx.append(http_client)
