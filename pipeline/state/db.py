"""The one place PostgreSQL connections are made (psycopg 3): single connections, sync and async pools.

Every connection gets the same guards, set here once: a connect timeout, a statement timeout, and an
idle-in-transaction timeout (a worker that hangs inside a transaction must not hold a claimed delivery row's
lock forever). Transactions are explicit: connections are not in autocommit unless asked.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import threading
import time
import weakref
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from pipeline.config import Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5
# Backstops, not latency targets: a query of the pipeline takes milliseconds; one that runs for 30 s is a bug
# or a lock pile-up, and failing it frees the worker.
STATEMENT_TIMEOUT_MS = 30_000
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000
APPLICATION_NAME = "notify-pipeline"
# For the rest of a transaction: a batch statement joined to `deliveries` by its keys probes the primary key once
# per key. Without it the planner may read every row of a state through that state's partial index and hash-join
# them: cheap by statistics taken while the pipeline was quiet, but during a spike `queued` holds the whole
# backlog, and each claim of 500 read all of it (605 ms a claim behind a 30k burst, measured with
# pg_stat_statements). Run it just before such a statement, in the same transaction.
BY_KEY_PLANS = ("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; "
                "SET LOCAL enable_bitmapscan = off")
POOL_OPEN_TIMEOUT_S = 30.0

SyncPool = ConnectionPool[psycopg.Connection[TupleRow]]
AsyncPool = AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]


def connection_kwargs(connect_timeout_s: int = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """libpq parameters every connection of the project is made with."""
    return {
        # libpq rounds a timeout below 2 s up to 2 s.
        "connect_timeout": max(2, connect_timeout_s),
        "application_name": APPLICATION_NAME,
        "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS} "
        f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}",
    }


def describe(settings: Settings) -> str:
    """host:port/dbname of the configured database, for messages (never the password)."""
    info = conninfo_to_dict(settings.dsn)
    return f"{info.get('host', 'localhost')}:{info.get('port', '5432')}/{info.get('dbname', '')}"


def connect(settings: Settings, *, autocommit: bool = False) -> psycopg.Connection[TupleRow]:
    """A new connection (the caller closes it; use it as a context manager)."""
    return psycopg.connect(settings.dsn, autocommit=autocommit, **connection_kwargs())


# Pools are cached per DSN: one pool per database per process, shared by every stage that asks.
_pools: dict[str, SyncPool] = {}
_pools_lock = threading.Lock()


def pool(settings: Settings) -> SyncPool:
    """The process's connection pool for settings.dsn, opened and with its first connection made."""
    with _pools_lock:
        existing = _pools.get(settings.dsn)
        if existing is not None:
            return existing
        created: SyncPool = ConnectionPool(
            settings.dsn,
            kwargs=connection_kwargs(),
            # Grows to db_pool_size on demand; connections idle for max_idle are closed again.
            min_size=1,
            max_size=settings.db_pool_size,
            # A pooled connection may have died with a server restart: check it before handing it out.
            check=ConnectionPool.check_connection,
            name=f"notify:{describe(settings)}",
            open=False,
        )
        try:
            created.open(wait=True, timeout=POOL_OPEN_TIMEOUT_S)
        except BaseException:
            created.close()  # its worker threads would otherwise keep retrying in the background
            raise
        _pools[settings.dsn] = created
        return created


def close_pools() -> None:
    """Close every cached sync pool (at exit, and in tests that want a clean slate)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for p in pools:
        p.close()


atexit.register(close_pools)

# A pooled connection is checked (a round trip) only when it was last handed out longer ago than this: one in
# steady use is known to work, and one that breaks mid-query is discarded by the pool when it comes back in a bad
# state. (Timed from the checkout, not the return: a `reset` callback would send every return through the pool's
# worker tasks.)
CHECK_AFTER_IDLE_S = 5.0
_handed_out_at: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


async def _check_if_idle(conn: psycopg.AsyncConnection[TupleRow]) -> None:
    now = time.monotonic()
    last = _handed_out_at.get(conn)
    if last is None or now - last > CHECK_AFTER_IDLE_S:
        await AsyncConnectionPool.check_connection(conn)
    _handed_out_at[conn] = now


# An async pool belongs to the event loop it was opened in, so the cache is per loop, then per DSN; a loop
# that is garbage-collected takes its entry with it.
_async_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncPool]] = (
    weakref.WeakKeyDictionary()
)
_async_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


async def async_pool(settings: Settings) -> AsyncPool:
    """The running loop's async pool for settings.dsn, opened and with its first connection made."""
    loop = asyncio.get_running_loop()
    lock = _async_locks.setdefault(loop, asyncio.Lock())
    async with lock:
        pools = _async_pools.setdefault(loop, {})
        existing = pools.get(settings.dsn)
        if existing is not None:
            return existing
        created: AsyncPool = AsyncConnectionPool(
            settings.dsn,
            kwargs=connection_kwargs(),
            min_size=1,
            max_size=settings.db_pool_size,
            check=_check_if_idle,
            name=f"notify-async:{describe(settings)}",
            open=False,
        )
        try:
            await created.open(wait=True, timeout=POOL_OPEN_TIMEOUT_S)
        except BaseException:
            await created.close()
            raise
        pools[settings.dsn] = created
        return created


async def close_async_pools() -> None:
    """Close the running loop's cached async pools (call before the loop ends)."""
    loop = asyncio.get_running_loop()
    pools = list(_async_pools.pop(loop, {}).values())
    for p in pools:
        await p.close()


def check(settings: Settings, timeout_s: float) -> None:
    """Return when the database answers `SELECT 1` (one attempt, bounded by about timeout_s); raise if not."""
    kwargs = connection_kwargs(connect_timeout_s=math.ceil(max(timeout_s, 0)))
    with psycopg.connect(settings.dsn, autocommit=True, **kwargs) as conn:
        row = conn.execute("SELECT 1").fetchone()
    if row != (1,):
        raise psycopg.OperationalError(f"SELECT 1 answered {row!r}")


def ready(settings: Settings, timeout_s: float) -> bool:
    """True as soon as the database answers `SELECT 1`; False if it has not within about timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            check(settings, remaining)
            return True
        except psycopg.Error as exc:
            log.debug("PostgreSQL at %s not ready: %s", describe(settings), exc)
        if time.monotonic() + 0.2 >= deadline:
            return False
        time.sleep(0.2)
