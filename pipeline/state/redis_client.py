"""The one way to make an asyncio Redis client: short socket timeouts (a hot path that waits on Redis longer than
a fraction of a second is worse off than one that treats Redis as away), one immediate reconnect (a restarted
Redis is found again at once), no periodic health-check round trip."""

from __future__ import annotations

from typing import Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

SOCKET_TIMEOUT_S: Final = 0.2
# One reconnect covers a pooled connection that Redis closed (restart, idle timeout); more would only add latency.
RECONNECT_RETRIES: Final = 1


def async_client(url: str, *, socket_timeout_s: float = SOCKET_TIMEOUT_S, decode_responses: bool = False
                 ) -> aioredis.Redis:
    """A client on `url` (e.g. `Settings.redis_dsn`)."""
    return aioredis.Redis.from_url(
        url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
        retry=Retry(NoBackoff(), RECONNECT_RETRIES), health_check_interval=0, decode_responses=decode_responses)
