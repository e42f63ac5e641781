"""The API share of a bench phase: requests posted to the run's API, in batches from a thread of its own or one at a
time."""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import threading
from collections.abc import Mapping
from typing import Any

import aiohttp

from pipeline.bench import load
from pipeline.bench.rig import BenchError

API_CONCURRENCY = 4


class ApiClient:
    """Posts requests to the run's API from a thread of its own (an event loop with an aiohttp session)."""

    def __init__(self, port: int, api_key: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.refused = 0

    def start_posting(self) -> tuple[queue.Queue[list[dict[str, Any]] | None], threading.Thread]:
        """A thread posting the batches put on the returned queue (None ends it); the queue is bounded, so the
        requests in memory stay few however large the run."""
        batches: queue.Queue[list[dict[str, Any]] | None] = queue.Queue(maxsize=4 * API_CONCURRENCY)
        thread = threading.Thread(target=lambda: asyncio.run(self._post_all(batches)), daemon=True,
                                  name="bench-api")
        thread.start()
        return batches, thread

    async def _post_all(self, batches: queue.Queue[list[dict[str, Any]] | None]) -> None:
        async with aiohttp.ClientSession(headers=self.headers) as session:

            async def post(batch: list[dict[str, Any]]) -> None:
                body = json.dumps({"notifications": [load.as_json(r) for r in batch]})
                for _attempt in range(5):
                    async with session.post(f"{self.base}/v1/notifications:batch", data=body) as resp:
                        await resp.read()
                        if resp.status == 202:
                            return
                    await asyncio.sleep(0.5)
                self.refused += len(batch)

            async def poster() -> None:
                while (batch := await asyncio.to_thread(batches.get)) is not None:
                    await post(batch)
                batches.put(None)  # the other posters end too

            await asyncio.gather(*(poster() for _ in range(API_CONCURRENCY)))

    def post_one(self, conn: http.client.HTTPConnection, req: Mapping[str, Any]) -> float:
        """POST one request; the time (epoch ms) its 202 arrived."""
        conn.request("POST", "/v1/notifications", body=json.dumps(load.as_json(req)), headers=self.headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 202:
            raise BenchError(f"the API answered {resp.status} to an idle OTP")
        return load.now_ms()
