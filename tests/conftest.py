"""Shared fixtures: the real local stack, started once per pytest session, and per-test isolation.

Tests never skip when a service is missing: they fail, because `make test` brings the stack up. Locally the stack
is left running after the session (the next run is warm); under CI it is stopped if this session started it.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator

import pytest

from pipeline import config, stack
from pipeline.api.keys import create_key
from pipeline.config import Settings
from pipeline.kafka import clients, topics
from pipeline.state import db

# The suite's own database on the local cluster (`notify stack up` creates it): `notify run` keeps `notify`, and its
# reconciler never re-drives what tests leave behind. Set before any settings are read, and inherited by every
# process a test starts.
os.environ.setdefault("NOTIFY_POSTGRES_DB", "notify_test")


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    """Settings of the running local stack (brought up here if needed)."""
    current = config.settings()
    was_running = stack.all_ready(current)
    if stack.up(current) != 0:
        pytest.fail("`notify stack up` failed; its output above says which service and why")
    yield current
    if os.environ.get("CI") == "true" and not was_running:
        stack.down(current)


@pytest.fixture
def unique() -> str:
    """A short unique token for user ids, keys and names, so tests never see each other's data."""
    return uuid.uuid4().hex[:12]


@pytest.fixture
def api_key(settings: Settings, unique: str) -> Iterator[str]:
    """A valid key of service `test-<unique>`; its row is deleted afterwards."""
    _, key = create_key(settings, f"test-{unique}")
    yield key
    with db.connect(settings) as conn, conn.transaction():
        conn.execute("DELETE FROM api_keys WHERE service = %s", (f"test-{unique}",))


@pytest.fixture
def prefixed_settings(settings: Settings, unique: str) -> Settings:
    """Settings whose topic names carry a prefix of this test's own (topics/ applied under that prefix)."""
    return dataclasses.replace(settings, topic_prefix=f"t{unique}.")


@pytest.fixture
def applied(prefixed_settings: Settings) -> Iterator[Settings]:
    """topics/ applied under this test's own prefix; deleted afterwards so the broker stays small."""
    topics.apply(prefixed_settings)
    yield prefixed_settings
    clients.delete_prefixed(prefixed_settings)
