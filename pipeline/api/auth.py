"""API-key authentication of the HTTP API: `Authorization: Bearer <key>` or `X-API-Key: <key>`.

A key is verified by comparing sha256(secret) with the stored hash in constant time. Valid keys are cached per
process for KEY_CACHE_TTL_S (5 s), so the database is asked at most once per key and interval: **a revoked key
stops working within KEY_CACHE_TTL_S**. Unknown and revoked keys are never cached (a new key works at once), and
malformed keys are refused without a lookup. When the database cannot answer, a key verified in the last
KEY_STALE_TTL_S (15 min) keeps working (ingest needs Kafka, not PostgreSQL: a revocation made meanwhile cannot
be read anyway, and takes effect within KEY_CACHE_TTL_S of the database answering again); other keys get 503
with Retry-After (never a 500, never a false 401).

Scopes: every route needs one (`ROUTE_SCOPES`, method + route template -> scope; a route nobody declared needs
`admin`). A valid key without it gets 403 naming the scope it lacks. The cache keeps each key's scopes with it, so
a changed scope, like a revocation, takes effect within KEY_CACHE_TTL_S. Paths under a public prefix (the ops
console, which has its own login) are left to their own handlers.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import psycopg
from aiohttp import web

from pipeline import metrics
from pipeline.api import keys
from pipeline.config import Settings

log = logging.getLogger(__name__)

KEY_CACHE_TTL_S: Final = 5.0
KEY_STALE_TTL_S: Final = 900.0
KEY_CACHE_MAX_ENTRIES: Final = 10_000
KEY_LOOKUP_TIMEOUT_S: Final = 3.0
# What each route needs; a route not named here needs admin. HEAD is what GET is.
DEFAULT_ROUTE_SCOPES: Final[dict[tuple[str, str], keys.Scope]] = {
    ("POST", "/v1/notifications"): "ingest",
    ("POST", "/v1/notifications:batch"): "ingest",
    ("GET", "/v1/users/{user_id}/settings"): "ingest",
    ("PUT", "/v1/users/{user_id}/settings"): "ingest",
}
UNAVAILABLE_RETRY_AFTER_S: Final = 5
# Reachable without a key: liveness, the API description, and the Prometheus scrape.
DEFAULT_PUBLIC_PATHS: Final = frozenset({"/health/live", "/health/ready", "/openapi.json", "/metrics"})

STALE_KEY_USES = metrics.counter(
    "notify_api_stale_key_uses_total", "Requests let in on a key verified earlier because the database could "
    "not be asked (up to KEY_STALE_TTL_S after the last successful check).")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Caller:
    """The authenticated key: its id, its service and what it may do."""

    key_id: str
    service: str
    scopes: tuple[str, ...]

    def allows(self, scope: keys.Scope) -> bool:
        return keys.allows(self.scopes, scope)

    def may_read(self, source_service: str) -> bool:
        return keys.may_read(self.scopes, self.service, source_service)


def required_scope(method: str, route: str, table: dict[tuple[str, str], keys.Scope]) -> keys.Scope:
    """The scope a request needs: its route's, admin for a route nobody declared."""
    return table.get(("GET" if method == "HEAD" else method, route), "admin")


class AuthUnavailable(Exception):
    """The key store could not be asked; the key may well be valid."""


@dataclass(frozen=True)
class _Cached:
    key: keys.ActiveKey
    until: float  # monotonic: trusted without a lookup until then
    stale_until: float  # monotonic: trusted until then when the database cannot answer


class KeyVerifier:
    """Checks presented keys against api_keys, with a short positive cache."""

    def __init__(self, settings: Settings, *, cache_ttl_s: float = KEY_CACHE_TTL_S,
                 lookup_timeout_s: float = KEY_LOOKUP_TIMEOUT_S, stale_ttl_s: float = KEY_STALE_TTL_S) -> None:
        self._settings = settings
        self._ttl_s = cache_ttl_s
        self._stale_ttl_s = stale_ttl_s
        self._lookup_timeout_s = lookup_timeout_s
        self._cache: dict[str, _Cached] = {}

    async def service_of(self, presented: str) -> str | None:
        """The service a valid key belongs to; None for a malformed, unknown, revoked or wrong key.
        AuthUnavailable when the database does not answer for a key not in the cache."""
        caller = await self.caller_of(presented)
        return None if caller is None else caller.service

    async def caller_of(self, presented: str) -> Caller | None:
        """The valid key presented (id, service, scopes); None for a malformed, unknown, revoked or wrong key.
        AuthUnavailable when the database does not answer for a key not in the cache."""
        parsed = keys.parse_key(presented)
        if parsed is None:
            return None
        key_id, secret = parsed
        active = await self.active_key(key_id)
        if active is None or not hmac.compare_digest(keys.hash_secret(secret), active.key_hash):
            return None
        return Caller(active.key_id, active.service, active.scopes)

    async def active_key(self, key_id: str) -> keys.ActiveKey | None:
        """The unrevoked key with this id (cached as above), without checking any secret: for a console session,
        whose signed cookie names the key it was opened with. AuthUnavailable as above."""
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and cached.until > now:
            active: keys.ActiveKey | None = cached.key
        else:
            try:
                active = await keys.find_active_key(self._settings, key_id, timeout_s=self._lookup_timeout_s)
            except (psycopg.Error, TimeoutError, OSError) as exc:
                if cached is None or cached.stale_until <= now:
                    log.warning("API key lookup failed: %s", exc)
                    raise AuthUnavailable(str(exc)) from exc
                STALE_KEY_USES.inc()
                active = cached.key
            else:
                self._remember(key_id, active, now)
        return active

    def _remember(self, key_id: str, active: keys.ActiveKey | None, now: float) -> None:
        if active is None:
            self._cache.pop(key_id, None)
            return
        if len(self._cache) >= KEY_CACHE_MAX_ENTRIES:  # drop the oldest entry (dicts keep insertion order)
            self._cache.pop(next(iter(self._cache)))
        self._cache.pop(key_id, None)
        self._cache[key_id] = _Cached(active, now + self._ttl_s, now + self._stale_ttl_s)


VERIFIER = web.AppKey("notify.key_verifier", KeyVerifier)
PUBLIC_PATHS = web.AppKey("notify.public_paths", set[str])  # add a path here to serve it without a key
PUBLIC_PREFIXES = web.AppKey("notify.public_prefixes", set[str])  # paths under these authenticate themselves
ROUTE_SCOPES = web.AppKey("notify.route_scopes", dict[tuple[str, str], keys.Scope])  # add a route's scope here
SERVICE = web.RequestKey("notify.service", str)  # the authenticated caller, set on every authenticated request
CALLER = web.RequestKey("notify.caller", Caller)  # the same, with its key id and scopes


def presented_key(request: web.Request) -> str | None:
    authorization = request.headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("X-API-Key", "").strip() or None


def _unauthorized(message: str) -> web.Response:
    return web.json_response({"error": message}, status=401,
                             headers={"WWW-Authenticate": 'Bearer realm="notify"'})


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in request.app[PUBLIC_PATHS] or any(
            request.path == prefix or request.path.startswith(prefix + "/") for prefix in request.app[PUBLIC_PREFIXES]):
        return await handler(request)
    presented = presented_key(request)
    if presented is None:
        return _unauthorized("missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    try:
        caller = await request.app[VERIFIER].caller_of(presented)
    except AuthUnavailable:
        return web.json_response({"error": "cannot verify the API key right now; retry later"}, status=503,
                                 headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)})
    if caller is None:
        return _unauthorized("unknown, revoked or malformed API key")
    if request.match_info.http_exception is None:  # an unknown route or method stays a 404 or 405
        resource = request.match_info.route.resource
        required = required_scope(request.method, resource.canonical if resource else "", request.app[ROUTE_SCOPES])
        if not caller.allows(required):
            return web.json_response(
                {"error": f"this API key (service {caller.service}, scopes {', '.join(caller.scopes)}) lacks the "
                          f"`{required}` scope this request needs; create one with `notify keys create "
                          f"{caller.service} --scope {required}`", "required_scope": required}, status=403)
    request[SERVICE] = caller.service
    request[CALLER] = caller
    return await handler(request)


def setup(app: web.Application, settings: Settings, *, cache_ttl_s: float = KEY_CACHE_TTL_S) -> None:
    """Require a valid API key on every route of `app` except its public paths."""
    app[VERIFIER] = KeyVerifier(settings, cache_ttl_s=cache_ttl_s)
    app[PUBLIC_PATHS] = set(DEFAULT_PUBLIC_PATHS)
    app[PUBLIC_PREFIXES] = set()
    app[ROUTE_SCOPES] = dict(DEFAULT_ROUTE_SCOPES)
    app.middlewares.append(auth_middleware)
