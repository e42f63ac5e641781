"""API keys of the HTTP API: create, revoke, list (table api_keys, infra/migrations/0002_api_keys.sql; scopes 0011).

A key reads `nk_<key_id>_<secret>`: key_id is 12 hex digits (public: lists, logs), secret is 32 random bytes in
URL-safe base64. Only sha256(secret) is stored: with 256 random bits there is nothing to brute-force, so a fast
hash is right, and a leaked table grants nothing. The full key is returned once, by `create_key`.

Each key has scopes: `ingest` (submit notifications, the settings API; the default, and what every key made before
scopes existed has), `read` (the read API, for the notifications of the key's own service) and `admin` (all of it,
every service's notifications, and the ops console). `allows` is the one rule.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from pipeline.config import Settings
from pipeline.errors import NotifyError
from pipeline.state import db

KEY_PREFIX: Final = "nk"
SECRET_BYTES: Final = 32
_KEY = re.compile(r"^nk_(?P<key_id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")
_SERVICE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")

Scope = Literal["ingest", "read", "admin"]
SCOPES: Final[tuple[Scope, ...]] = ("ingest", "read", "admin")
DEFAULT_SCOPES: Final[tuple[Scope, ...]] = ("ingest",)


def allows(scopes: Sequence[str], required: Scope) -> bool:
    """Whether a key with `scopes` may do what needs `required`: admin may do everything."""
    return required in scopes or "admin" in scopes


def may_read(scopes: Sequence[str], key_service: str, source_service: str) -> bool:
    """Whether a key may read a notification produced by `source_service`: its own service's, or any with admin."""
    return "admin" in scopes or ("read" in scopes and source_service == key_service)


def normalise_scopes(scopes: Sequence[str]) -> tuple[Scope, ...]:
    """Known scopes, each once, in SCOPES order; ApiKeyError naming an unknown one, or none given."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ApiKeyError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    if not scopes:
        raise ApiKeyError(f"a key needs at least one scope of {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in scopes)


class ApiKeyError(NotifyError):
    """An API key operation was refused (e.g. a malformed service name)."""


@dataclass(frozen=True)
class ApiKeyInfo:
    """What may be shown about a key: never its secret or hash."""

    key_id: str
    service: str
    created_at: datetime.datetime
    revoked_at: datetime.datetime | None
    scopes: tuple[str, ...] = DEFAULT_SCOPES

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class ActiveKey:
    """A valid key as the verifier needs it."""

    key_id: str
    service: str
    key_hash: str
    scopes: tuple[str, ...] = DEFAULT_SCOPES


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def parse_key(presented: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key; None for anything else (no database lookup needed to refuse it)."""
    match = _KEY.match(presented)
    return (match["key_id"], match["secret"]) if match else None


def create_key(settings: Settings, service: str, scopes: Sequence[str] = DEFAULT_SCOPES) -> tuple[str, str]:
    """A new key for `service` with `scopes`: (key_id, api_key). Show api_key (`nk_<key_id>_<secret>`) once; it
    cannot be recovered, only revoked and replaced."""
    if not _SERVICE.match(service):
        raise ApiKeyError(f"service {service!r}: use 1 to 100 letters, digits, '.', '_' or '-'")
    chosen = list(normalise_scopes(scopes))
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    with db.connect(settings) as conn, conn.transaction():
        conn.execute("INSERT INTO api_keys (key_id, service, key_hash, scopes) VALUES (%s, %s, %s, %s)",
                     (key_id, service, hash_secret(secret), chosen))
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"


def revoke_key(settings: Settings, key_id: str) -> bool:
    """Revoke a key; False when there is no such valid key (unknown or already revoked). API processes stop
    accepting it within their cache time (auth.KEY_CACHE_TTL_S)."""
    with db.connect(settings) as conn, conn.transaction():
        cursor = conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = %s AND revoked_at IS NULL", (key_id,))
        return cursor.rowcount == 1


def list_keys(settings: Settings) -> list[ApiKeyInfo]:
    """Every key, newest first, revoked ones included."""
    with db.connect(settings) as conn:
        rows = conn.execute(
            "SELECT key_id, service, created_at, revoked_at, scopes FROM api_keys ORDER BY created_at DESC, key_id"
        ).fetchall()
    return [ApiKeyInfo(row[0], row[1], row[2], row[3], tuple(row[4])) for row in rows]


async def find_active_key(settings: Settings, key_id: str, *, timeout_s: float) -> ActiveKey | None:
    """The valid (unrevoked) key with this id, or None. Raises psycopg errors or TimeoutError when the database
    cannot answer within `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        pool = await db.async_pool(settings)
        async with pool.connection(timeout=timeout_s) as conn:
            cursor = await conn.execute(
                "SELECT key_id, service, key_hash, scopes FROM api_keys WHERE key_id = %s AND revoked_at IS NULL",
                (key_id,))
            row = await cursor.fetchone()
    return None if row is None else ActiveKey(row[0], row[1], row[2], tuple(row[3]))
