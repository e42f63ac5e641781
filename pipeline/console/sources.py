"""Where the console's pages read from: the processes' /metrics and /health/ready (or Prometheus when PROMETHEUS_URL
is set), the breakers in Redis, today's attempts in PostgreSQL. Every outside call has a timeout; a process or
store that does not answer is shown as such, never an error page."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from redis.exceptions import RedisError

from pipeline.config import Settings
from pipeline.console import figures
from pipeline.domain import PROVIDERS
from pipeline.kafka import serde
from pipeline.policy.regions import CountryLabels
from pipeline.state import redis_client

SCRAPE_TIMEOUT_S: Final = 2.0
RATE_WINDOW_S: Final = 1.0  # without an earlier scrape, two scrapes this far apart give the rates
EARLIER_SCRAPE_MAX_AGE_S: Final = 300.0
PROVIDER_SAMPLE: Final = 20_000  # today's latest attempts the providers page reads at most
BREAKER_TIMEOUT_S: Final = 1.0

# Today's attempts, newest first, bounded: attempt ids grow with time, so the primary key serves the range.
TODAY_ATTEMPTS: Final = """
SELECT a.provider, a.channel, a.outcome, a.latency_ms, a.cost_micros, d.task
FROM notification_attempts a JOIN deliveries d USING (notification_id, channel)
WHERE a.attempt_id >= %(first_id)s AND a.started_at >= %(since)s
ORDER BY a.attempt_id DESC LIMIT %(limit)s
"""
FIRST_ID_AT_OR_AFTER: Final = "SELECT min(attempt_id), max(attempt_id) FROM notification_attempts"
STARTED_AT_OF: Final = "SELECT started_at FROM notification_attempts WHERE attempt_id >= %s ORDER BY attempt_id LIMIT 1"


@dataclass(frozen=True)
class Process:
    job: str  # api, workers, exporter
    name: str
    port: int
    ready: bool
    detail: str


@dataclass
class Scrape:
    at: float
    samples: dict[int, figures.Samples]


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)) as response:
        return response.status, await response.text()


def targets(settings: Settings) -> list[tuple[str, str, int]]:
    """(job, name, port) of every process of the pipeline, from the ports in force."""
    from pipeline.stack.prometheus import targets as scrape_targets

    out = []
    for job, entries in scrape_targets(settings).items():
        for port, labels in entries:
            name = f"{labels['stage']}/{labels['lane']}" if "stage" in labels else job
            out.append((job, name, port))
    return out


async def readiness(settings: Settings, session: aiohttp.ClientSession) -> list[Process]:
    async def one(job: str, name: str, port: int) -> Process:
        try:
            status, body = await _get(session, f"http://127.0.0.1:{port}/health/ready")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Process(job, name, port, False, f"not answering ({type(exc).__name__})")
        if status == 200:
            return Process(job, name, port, True, "ready")
        try:
            checks = json.loads(body).get("checks", {})
            failing = ", ".join(f"{k}: {v}" for k, v in checks.items() if not str(v).startswith("ok"))
        except (ValueError, AttributeError):
            failing = body[:200]
        return Process(job, name, port, False, f"{status}: {failing or 'not ready'}")

    return list(await asyncio.gather(*(one(*target) for target in targets(settings))))


async def scrape(settings: Settings, session: aiohttp.ClientSession) -> Scrape:
    async def one(port: int) -> tuple[int, figures.Samples]:
        try:
            status, body = await _get(session, f"http://127.0.0.1:{port}/metrics")
            return port, figures.parse_samples(body) if status == 200 else {}
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return port, {}

    answers = await asyncio.gather(*(one(port) for job, _, port in targets(settings) if job != "api"))
    return Scrape(time.monotonic(), dict(answers))


def _merged(scrape: Scrape) -> figures.Samples:
    merged: figures.Samples = {}
    for port, samples in scrape.samples.items():
        for (name, labels), value in samples.items():
            merged[(name, (*labels, ("port", str(port))))] = value
    return merged


def _by_stage(totals: Mapping[tuple[str, ...], float]) -> dict[figures.StageKey, float]:
    return {(key[0], key[1]): value for key, value in totals.items()}


class PipelineFigures:
    """Lag, throughput and error rate per stage and lane; keeps its previous scrape for the next view's rates."""

    def __init__(self) -> None:
        self.previous: Scrape | None = None

    async def read(self, settings: Settings, session: aiohttp.ClientSession) -> tuple[list[figures.StageFigures],
                                                                                    str]:
        stages = [(target[1].split("/")[0], target[1].split("/")[1])
                  for target in targets(settings) if target[0] == "workers"]
        if settings.prometheus_url:
            return await self._from_prometheus(settings, session, stages), f"Prometheus at {settings.prometheus_url}"
        previous = self.previous
        age = None if previous is None else time.monotonic() - previous.at
        if previous is None or age is None or not RATE_WINDOW_S <= age <= EARLIER_SCRAPE_MAX_AGE_S:
            previous = await scrape(settings, session)
            await asyncio.sleep(RATE_WINDOW_S)
        current = await scrape(settings, session)
        self.previous = current
        now, before = _merged(current), _merged(previous)
        lag = _by_stage(figures.sum_by(now, figures.LAG, "stage", "lane"))
        result = figures.stage_figures(
            stages, {**{k: v for k, v in lag.items() if k[1]}, **_lane_free(lag)},
            _by_stage(figures.sum_by(now, figures.MESSAGES, "stage", "lane")),
            _by_stage(figures.sum_by(now, figures.ERRORS, "stage", "lane")),
            _by_stage(figures.sum_by(before, figures.MESSAGES, "stage", "lane")),
            _by_stage(figures.sum_by(before, figures.ERRORS, "stage", "lane")), current.at - previous.at)
        return result, f"the processes' /metrics, two scrapes {current.at - previous.at:.1f} s apart"

    async def _from_prometheus(self, settings: Settings, session: aiohttp.ClientSession,
                               stages: list[figures.StageKey]) -> list[figures.StageFigures]:
        prefix = settings.topic_prefix

        async def query(promql: str) -> dict[figures.StageKey, float]:
            url = f"{settings.prometheus_url}/api/v1/query?query={urllib.parse.quote(promql)}"
            try:
                status, body = await _get(session, url)
                result = json.loads(body)["data"]["result"] if status == 200 else []
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError):
                return {}
            return {(r["metric"].get("stage", ""), r["metric"].get("lane", "")): float(r["value"][1]) for r in result}

        group = f'group=~"{prefix}notify-.*"'
        lag, messages, errors = await asyncio.gather(
            query(f"sum by (stage, lane) ({figures.LAG}{{{group}}})"),
            query(f"sum by (stage, lane) (rate({figures.MESSAGES}[1m]))"),
            query(f"sum by (stage, lane) (rate({figures.ERRORS}[1m]))"))
        return [figures.StageFigures(stage, lane, lag.get((stage, lane), lag.get((stage, ""))),
                                     messages.get((stage, lane)), errors.get((stage, lane)))
                for stage, lane in stages]


def _lane_free(lag: Mapping[figures.StageKey, float]) -> dict[figures.StageKey, float]:
    """Receipts and reconcile have one group for both lanes: shown on the process's own (first) lane."""
    return {(stage, "critical"): value for (stage, lane), value in lag.items() if not lane}


async def breakers(settings: Settings) -> dict[str, dict[str, str]]:
    """Each provider's stored breaker (closed or open, since when), read without side effects; `unknown` when
    Redis does not answer."""
    client = redis_client.async_client(settings.redis_dsn, socket_timeout_s=BREAKER_TIMEOUT_S, decode_responses=True)
    out: dict[str, dict[str, str]] = {}
    try:
        pipe = client.pipeline(transaction=False)
        for provider in PROVIDERS:
            pipe.hgetall(f"{settings.topic_prefix}notify:breaker:{provider}")
        answers = await pipe.execute()
        now = time.time()
        for provider, stored in zip(PROVIDERS, answers, strict=True):
            state = stored.get("state", "closed")
            since = float(stored.get("opened_at" if state == "open" else "closed_at", 0) or 0)
            if state == "open" and now - since >= settings.breaker_open_s:
                state = "open (probe due)"
            out[provider] = {"state": state, "since": datetime.datetime.fromtimestamp(since, datetime.UTC)
                             .strftime("%Y-%m-%d %H:%M:%S") if since else "-"}
    except (RedisError, OSError) as exc:
        out = {p: {"state": "unknown", "since": f"Redis: {exc}"} for p in PROVIDERS}
    finally:
        await client.aclose()
    return out


async def _first_id_since(conn: Any, since: datetime.datetime) -> int | None:
    """The smallest attempt id started at or after `since` (binary search over the primary key: attempt ids grow
    with time), None when there is none."""
    bounds = await (await conn.execute(FIRST_ID_AT_OR_AFTER)).fetchone()
    if bounds is None or bounds[0] is None:
        return None
    low, high = int(bounds[0]), int(bounds[1])
    while low < high:
        middle = (low + high) // 2
        row = await (await conn.execute(STARTED_AT_OF, (middle,))).fetchone()
        if row is not None and row[0] >= since:
            high = middle
        else:
            low = middle + 1
    row = await (await conn.execute(STARTED_AT_OF, (low,))).fetchone()
    return low if row is not None and row[0] >= since else None


async def today_attempts(conn: Any, settings: Settings, now: datetime.datetime
                         ) -> tuple[list[figures.AttemptFact], datetime.datetime]:
    """Today's (UTC) attempts, newest first, at most PROVIDER_SAMPLE, with the country and body of each."""
    since = now.astimezone(datetime.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    first = await _first_id_since(conn, since)
    if first is None:
        return [], since
    rows = await (await conn.execute(TODAY_ATTEMPTS, {"first_id": first, "since": since,
                                                      "limit": PROVIDER_SAMPLE})).fetchall()
    codec = serde.AvroSerde()
    countries = CountryLabels()
    facts = []
    for provider, channel, outcome, latency_ms, cost_micros, task in rows:
        address, body = None, ""
        if task is not None:
            try:
                decoded = codec.decode(bytes(task), expected=serde.DELIVERY_TASK).value
                address = decoded.get("address")
                body = (decoded.get("content") or {}).get("body") or ""
            except Exception:  # an old or foreign record: counted without a country
                pass
        country = countries.of(address) if channel == "sms" else "none"
        facts.append(figures.AttemptFact(provider, channel, country, outcome,
                                         None if latency_ms is None else float(latency_ms), cost_micros, body))
    return facts, since
