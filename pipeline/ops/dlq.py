"""The dead-letter queue for people: `notify dlq list | show | redrive [--filter key=value ...] [--dry-run]`.

The DLQ topic is read from its beginning to its end (no consumer group: reading it commits nothing and moves
nothing). Each entry is the original send record with why it is there in headers (reason, detail, attempt
history, source topic/partition/offset, send topic).

Redrive puts an entry's task back on its send topic once: the `deliveries` row moves `dead_lettered -> queued`
(retry tiers start again) in the same step that decides to re-inject it, so redriving the same entries again
finds the row no longer dead-lettered and sends nothing more. An entry without a row in `dead_lettered`
(redriven already, or resolved since) is skipped and said so.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException

from pipeline.config import Settings
from pipeline.errors import NotifyError
from pipeline.kafka import clients, serde, topics
from pipeline.stages import retry
from pipeline.stages.context import StageContext
from pipeline.stages.records import HEADER_DETAIL, HEADER_REASON, HEADER_SOURCE, Record, utcnow
from pipeline.state import db, deliveries

READ_TIMEOUT_S = 10.0
FILTER_KEYS = ("reason", "channel", "lane", "type", "notification_id", "provider", "user_id")


class DlqError(NotifyError):
    """A bad filter or an unreadable DLQ."""


@dataclass(frozen=True)
class Entry:
    partition: int
    offset: int
    record: Record
    task: dict[str, Any] | None  # None when the value does not decode (it is listed, never redriven)

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"

    def header(self, name: str) -> str:
        return self.record.headers.get(name, b"").decode(errors="replace")

    @property
    def attempts(self) -> list[dict[str, Any]]:
        return retry.decode_history(self.record.headers)

    @property
    def fields(self) -> dict[str, str]:
        """What filters match on."""
        task = self.task or {}
        last = self.attempts[-1] if self.attempts else {}
        return {"reason": self.header(HEADER_REASON), "channel": self.header(retry.HEADER_CHANNEL),
                "lane": self.header(retry.HEADER_LANE), "type": str(task.get("type", "")),
                "notification_id": self.header(retry.HEADER_NOTIFICATION), "provider": str(last.get("provider", "")),
                "user_id": str(task.get("user_id", ""))}

    def summary(self) -> dict[str, Any]:
        return {"position": self.position, **self.fields, "attempts": len(self.attempts),
                "dead_lettered_at": self.header(retry.HEADER_DEAD_AT), "detail": self.header(HEADER_DETAIL)}

    def details(self) -> dict[str, Any]:
        return {**self.summary(), "source": self.header(HEADER_SOURCE),
                "send_topic": self.header(retry.HEADER_SEND_TOPIC), "attempt_history": self.attempts,
                "task": {k: str(v) if v is not None and not isinstance(v, int | float | bool | list | dict) else v
                         for k, v in (self.task or {}).items()}}


def parse_filters(pairs: Sequence[str]) -> dict[str, str]:
    filters: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in FILTER_KEYS:
            raise DlqError(f"--filter {pair!r}: expected key=value with key one of {', '.join(FILTER_KEYS)}")
        filters[key] = value
    return filters


def matches(entry: Entry, filters: Mapping[str, str]) -> bool:
    fields = entry.fields
    return all(fields.get(key) == value for key, value in filters.items())


def read(settings: Settings) -> list[Entry]:
    """Every record of the DLQ, oldest first."""
    codec = serde.serde(settings)
    try:
        messages = clients.read_to_end(settings, settings.topic(topics.DLQ),
                                       f"{settings.topic_prefix}notify-dlq-reader", READ_TIMEOUT_S)
    except (KafkaException, TimeoutError) as exc:
        raise DlqError(str(exc.args[0] if exc.args else exc)) from None
    entries: list[Entry] = []
    for message in messages:
        record = Record.of(message)
        try:
            task = codec.decode(record.value or b"", expected=serde.DELIVERY_TASK).value
        except Exception:  # listed as is: a DLQ must show what it holds, decodable or not
            task = None
        entries.append(Entry(record.partition, record.offset, record, task))
    return sorted(entries, key=lambda e: (e.record.timestamp_ms, e.partition, e.offset))


def select(entries: Iterable[Entry], filters: Mapping[str, str], position: str | None = None) -> list[Entry]:
    return [e for e in entries if matches(e, filters) and (position is None or e.position == position)]


@dataclass
class RedriveResult:
    redriven: list[str]
    skipped: list[tuple[str, str]]  # (position, why)


async def redrive(settings: Settings, entries: Sequence[Entry], *, dry_run: bool = False) -> RedriveResult:
    """Re-inject every entry whose delivery is still dead-lettered, once (see the module's doc)."""
    result = RedriveResult([], [])
    ctx = StageContext(settings=settings, stage="dlq", lane="critical", producer=clients.producer(settings))
    pool = await db.async_pool(settings)
    seen: set[tuple[str, str]] = set()
    for entry in entries:
        fields = entry.fields
        key = (fields["notification_id"], fields["channel"])
        if entry.task is None:
            result.skipped.append((entry.position, "the record does not decode"))
            continue
        if key in seen:
            result.skipped.append((entry.position, "a later entry of the same delivery is redriven"))
            continue
        seen.add(key)
        async with pool.connection() as conn:
            rows = await deliveries.fetch(conn, "d.notification_id = %s AND d.channel = %s", key)
            row = rows[0] if rows else None
            if row is None or row.state != "dead_lettered":
                result.skipped.append((entry.position, f"delivery is {row.state if row else 'missing'}"))
                continue
            if dry_run:
                result.redriven.append(entry.position)
                continue
            if not await deliveries.transition(conn, row, "queued", code="redriven", message="redriven from the DLQ",
                                               reset_tier=True):
                result.skipped.append((entry.position, "delivery moved meanwhile"))
                continue
        ctx.send(topics.send_topic(row.channel, row.lane), entry.record.key, entry.record.value,
                 {**retry.release_headers(entry.record), retry.HEADER_REDRIVEN: utcnow().isoformat().encode()})
        ctx.emit(row.subject, "queued", channel=row.channel, lane=row.lane, attempt=row.attempt_count,
                       error_code="redriven", error_message=f"redriven from the DLQ ({entry.position})")
        result.redriven.append(entry.position)
    await ctx.settle()
    return result


def run_dlq_cli(settings: Settings, action: str, filters: Sequence[str], position: str | None, dry_run: bool,
                as_json: bool) -> int:
    chosen = select(read(settings), parse_filters(filters), position)
    if action == "list":
        for entry in chosen:
            summary = entry.summary()
            print(json.dumps(summary) if as_json else
                  f"{summary['position']:>8}  {summary['dead_lettered_at'][:19]:19}  {summary['lane']:8} "
                  f"{summary['channel']:5} {summary['reason']:18} {summary['notification_id']}  "
                  f"{summary['attempts']} attempts, last {summary['provider'] or '-'}: {summary['detail'][:60]}")
        if not as_json:
            print(f"{len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'}")
        return 0
    if action == "show":
        if not chosen:
            raise DlqError("no entry matches (give --position P:O or --filter notification_id=...)")
        for entry in chosen:
            print(json.dumps(entry.details(), indent=2, default=str))
        return 0
    result = asyncio.run(_redrive_and_close(settings, chosen, dry_run))
    verb = "would redrive" if dry_run else "redriven"
    print(f"{verb}: {len(result.redriven)}; skipped: {len(result.skipped)}")
    for position, why in result.skipped:
        print(f"  skipped {position}: {why}")
    return 0


async def _redrive_and_close(settings: Settings, chosen: Sequence[Entry], dry_run: bool) -> RedriveResult:
    try:
        return await redrive(settings, chosen, dry_run=dry_run)
    finally:
        await db.close_async_pools()
