"""The one way our long-running processes (workers, the API, the simulator) run their event loop: uvloop.

uvloop (libuv under asyncio's API) cuts the loop's own cost per callback, socket read and timer, which is most of
what an HTTP call costs the sender, the simulator and the webhook receiver. Everything we use on the loop (aiohttp,
psycopg's async connections, redis.asyncio) runs on it unchanged.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a new uvloop event loop (asyncio.run's semantics)."""
    return uvloop.run(main)
