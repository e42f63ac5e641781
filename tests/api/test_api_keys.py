"""API keys in the real database: created keys open the API, revoked keys stop working, secrets are never stored."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pipeline.api import create_app
from pipeline.api.keys import ApiKeyError, create_key, list_keys, parse_key, revoke_key
from pipeline.config import Settings
from pipeline.state import db

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def service(settings: Settings, unique: str) -> Iterator[str]:
    """A service name of this test's own; its keys are deleted afterwards."""
    name = f"test-{unique}"
    yield name
    with db.connect(settings) as conn, conn.transaction():
        conn.execute("DELETE FROM api_keys WHERE service = %s", (name,))


@asynccontextmanager
async def serving(settings: Settings, **options: Any) -> AsyncIterator[Client]:
    try:
        async with TestClient(TestServer(create_app(settings, **options))) as client:
            yield client
    finally:
        await db.close_async_pools()


async def authenticated(client: Client, key: str) -> bool:
    """Whether the API lets `key` past authentication (an empty body is then refused as 422, not 401)."""
    response = await client.post("/v1/notifications", json={}, headers={"Authorization": f"Bearer {key}"})
    assert response.status in (401, 422), await response.text()
    return response.status == 422


async def test_a_created_key_opens_the_api_and_a_revoked_one_is_refused(settings: Settings, service: str) -> None:
    key_id, key = create_key(settings, service)
    other_id, other = create_key(settings, service)
    assert revoke_key(settings, other_id) is True
    async with serving(settings) as client:
        assert await authenticated(client, key)
        assert not await authenticated(client, other)
    assert key.startswith(f"nk_{key_id}_")


async def test_a_revoked_key_stops_working_within_the_cache_time(settings: Settings, service: str) -> None:
    key_id, key = create_key(settings, service)
    async with serving(settings, key_cache_ttl_s=0.5) as client:
        assert await authenticated(client, key)
        revoke_key(settings, key_id)
        assert await authenticated(client, key)  # still cached: the documented grace
        await asyncio.sleep(0.6)
        assert not await authenticated(client, key)


async def test_a_key_with_the_right_id_and_a_wrong_secret_is_refused_even_when_cached(
        settings: Settings, service: str) -> None:
    _, key = create_key(settings, service)
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")
    async with serving(settings) as client:
        assert await authenticated(client, key)
        assert not await authenticated(client, forged)


async def test_an_unreachable_key_store_is_503_with_retry_after_not_401(settings: Settings, service: str) -> None:
    _, key = create_key(settings, service)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    no_database = dataclasses.replace(settings, database_url=f"postgresql://notify:notify@127.0.0.1:{port}/notify")
    async with serving(no_database) as client:
        response = await client.post("/v1/notifications", json={}, headers={"X-API-Key": key})
        assert response.status == 503
        assert int(response.headers["Retry-After"]) > 0


def test_only_the_hash_of_the_secret_is_stored(settings: Settings, service: str) -> None:
    key_id, key = create_key(settings, service)
    parsed = parse_key(key)
    assert parsed is not None and parsed[0] == key_id
    secret = parsed[1]
    with db.connect(settings) as conn:
        row = conn.execute("SELECT * FROM api_keys WHERE key_id = %s", (key_id,)).fetchone()
    assert row is not None
    stored = [str(value) for value in row]
    assert hashlib.sha256(secret.encode()).hexdigest() in stored
    assert not any(secret in value or key in value for value in stored)


def test_keys_are_listed_with_their_revocation_and_revoking_twice_says_so(settings: Settings, service: str) -> None:
    key_id, _ = create_key(settings, service)
    assert revoke_key(settings, key_id) is True
    assert revoke_key(settings, key_id) is False
    assert revoke_key(settings, "ffffffffffff") is False
    (listed,) = [k for k in list_keys(settings) if k.key_id == key_id]
    assert listed.service == service and listed.revoked_at is not None and not listed.active
    assert listed.revoked_at >= listed.created_at


def test_a_malformed_service_name_is_refused_before_anything_is_stored(settings: Settings) -> None:
    with pytest.raises(ApiKeyError):
        create_key(settings, "bad service; drop table")
    assert parse_key("nk_short_secret") is None


def test_a_key_has_the_scopes_it_was_created_with_and_keys_from_before_scopes_have_ingest(
        settings: Settings, service: str) -> None:
    key_id, _ = create_key(settings, service, ["read", "admin"])
    default_id, _ = create_key(settings, service)
    with db.connect(settings) as conn, conn.transaction():  # a row as 0002 wrote them: no scopes given
        conn.execute("INSERT INTO api_keys (key_id, service, key_hash) VALUES ('00000000abcd', %s, %s)",
                     (service, "0" * 64))
    scopes = {k.key_id: k.scopes for k in list_keys(settings) if k.service == service}
    assert scopes == {key_id: ("read", "admin"), default_id: ("ingest",), "00000000abcd": ("ingest",)}
    with pytest.raises(ApiKeyError, match="unknown scope"):
        create_key(settings, service, ["superuser"])


def test_notify_keys_create_takes_repeated_scopes(settings: Settings, service: str) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pipeline", "keys", "create", service, "--scope", "ingest",
                           "--scope", "read"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "scopes ingest, read" in done.stdout
    [listed] = [k for k in list_keys(settings) if k.service == service]
    assert listed.scopes == ("ingest", "read")
    refused = subprocess.run([sys.executable, "-m", "pipeline", "keys", "create", service, "--scope", "root"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode != 0 and "invalid choice" in refused.stderr
