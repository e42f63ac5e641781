"""The one way our long-running processes (workers, the API, the simulator) run their event loop: uvloop.

uvloop (libuv under asyncio's API) cuts the loop's own cost per callback, socket read and timer, which is most of
what an HTTP call costs the sender, the simulator and the webhook receiver. Everything we use on the loop (aiohttp,
psycopg's async connections, redis.asyncio) runs on it unchanged.
"""

from __future__ import annotations

import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


# A batch allocates many short-lived objects (decoded records, tasks, events): with the default threshold (700) the
# collector runs a young-generation pass every few records. Nothing we keep on a hot path forms reference cycles, so
# rarer passes lose nothing and cost less.
GC_THRESHOLDS = (20_000, 20, 20)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a new uvloop event loop (asyncio.run's semantics)."""
    gc.freeze()  # what start-up made (modules, schemas, clients) is never collected: skip it on every pass
    gc.set_threshold(*GC_THRESHOLDS)
    return uvloop.run(main)
