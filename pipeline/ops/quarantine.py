"""The quarantine topic for people: `notify invalid list | show | redrive [--filter key=value ...] [--since T]
[--until T] [--position P:O] [--dry-run]`.

`invalid` holds the original bytes of every record a stage could not take (undecodable, a request that breaks the
contract, a record whose data broke a stage's statement), with why and where from in headers (reason, detail,
stage, source topic/partition/offset). It is read from its beginning to its end without a consumer group's
commit: reading moves nothing.

After a fix, redrive puts an entry's original key and bytes back on the topic they came from, **once**: the entry's
position is recorded in `quarantine_redrives` in the transaction that is committed only after Kafka acknowledged
the record, so redriving the same entries again skips them. The stage that quarantined it reads it again like any
other record; a request still wrong is quarantined again (a new entry), a request intake already stored is a
duplicate, and a send task is claimed before any provider call, so nothing is sent twice.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from confluent_kafka import KafkaException

from pipeline.config import Settings
from pipeline.errors import NotifyError
from pipeline.kafka import clients, serde, topics
from pipeline.stages.records import HEADER_DETAIL, HEADER_REASON, HEADER_SOURCE, HEADER_STAGE, Record
from pipeline.state import db

READ_TIMEOUT_S: Final = 10.0
FLUSH_TIMEOUT_S: Final = 30.0
QUARANTINE_HEADERS: Final = frozenset({HEADER_REASON, HEADER_DETAIL, HEADER_SOURCE, HEADER_STAGE})
HEADER_REDRIVEN: Final = "notify-redriven"  # on a redriven record: when, and from which quarantine entry
FILTER_KEYS: Final = ("reason", "stage", "source_topic", "key")

RECORD_REDRIVES: Final = """
INSERT INTO quarantine_redrives (entry, source)
SELECT * FROM unnest(%s::text[], %s::text[])
ON CONFLICT DO NOTHING
RETURNING entry
"""


class QuarantineError(NotifyError):
    """A bad filter or time, or an unreadable quarantine topic."""


@dataclass(frozen=True)
class Entry:
    topic: str  # the quarantine topic, as named on the cluster
    record: Record

    @property
    def position(self) -> str:
        return f"{self.record.partition}:{self.record.offset}"

    @property
    def identity(self) -> str:
        """What `quarantine_redrives` remembers (the topic is prefixed per deployment or test)."""
        return f"{self.topic}/{self.position}"

    def header(self, name: str) -> str:
        return self.record.headers.get(name, b"").decode(errors="replace")

    @property
    def source(self) -> tuple[str, int, int] | None:
        """(topic, partition, offset) the bytes came from; None when the header is missing or malformed."""
        parts = self.header(HEADER_SOURCE).rsplit("/", 2)
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
            return None
        return parts[0], int(parts[1]), int(parts[2])

    @property
    def quarantined_at(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.record.timestamp_ms / 1000, datetime.UTC)

    @property
    def fields(self) -> dict[str, str]:
        """What filters match on."""
        source = self.source
        return {"reason": self.header(HEADER_REASON), "stage": self.header(HEADER_STAGE),
                "source_topic": source[0] if source else "",
                "key": (self.record.key or b"").decode(errors="replace")}

    def summary(self) -> dict[str, Any]:
        return {"position": self.position, "quarantined_at": self.quarantined_at.isoformat(), **self.fields,
                "source": self.header(HEADER_SOURCE), "detail": self.header(HEADER_DETAIL)}

    def details(self, codec: serde.AvroSerde) -> dict[str, Any]:
        """The summary, every header, and the payload: decoded when it is one of our records, else its bytes."""
        value = self.record.value or b""
        payload: dict[str, Any]
        try:
            decoded = codec.decode(value)
            payload = {"record": decoded.record, "value": _printable(decoded.value)}
        except Exception as exc:  # shown as is: quarantine must show what it holds, decodable or not
            payload = {"undecodable": str(exc), "bytes": len(value), "utf8": value[:2000].decode(errors="replace"),
                       "hex": value[:256].hex()}
        return {**self.summary(), "headers": {k: v.decode(errors="replace") for k, v in self.record.headers.items()},
                "payload": payload}


def _printable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    if value is None or isinstance(value, int | float | bool | str):
        return value
    return str(value)


def parse_filters(pairs: Sequence[str]) -> dict[str, str]:
    filters: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in FILTER_KEYS:
            raise QuarantineError(f"--filter {pair!r}: expected key=value with key one of {', '.join(FILTER_KEYS)}")
        filters[key] = value
    return filters


def parse_time(text: str | None, option: str) -> datetime.datetime | None:
    """An ISO 8601 time (no zone: UTC)."""
    if text is None:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise QuarantineError(f"{option} {text!r}: not an ISO 8601 time (e.g. 2026-12-03T14:00)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def select(entries: Iterable[Entry], filters: Mapping[str, str], *, since: datetime.datetime | None = None,
           until: datetime.datetime | None = None, position: str | None = None) -> list[Entry]:
    """The entries every filter matches (all must), quarantined in [since, until), at `position` when given."""
    return [e for e in entries
            if all(e.fields.get(k) == v for k, v in filters.items())
            and (since is None or e.quarantined_at >= since) and (until is None or e.quarantined_at < until)
            and (position is None or e.position == position)]


def read(settings: Settings) -> list[Entry]:
    """Every record of the quarantine topic, oldest first."""
    name = settings.topic(topics.INVALID)
    try:
        messages = clients.read_to_end(settings, name, f"{settings.topic_prefix}notify-invalid-reader", READ_TIMEOUT_S)
    except (KafkaException, TimeoutError) as exc:
        raise QuarantineError(str(exc.args[0] if exc.args else exc)) from None
    entries = [Entry(name, Record.of(message)) for message in messages]
    return sorted(entries, key=lambda e: (e.record.timestamp_ms, e.record.partition, e.record.offset))


@dataclass
class RedriveResult:
    redriven: list[str]
    skipped: list[tuple[str, str]]  # (position, why)


def redrive(settings: Settings, entries: Sequence[Entry], *, dry_run: bool = False) -> RedriveResult:
    """Put each entry's original key and bytes back on its source topic, once (see the module's doc)."""
    result = RedriveResult([], [])
    sourced = []
    for entry in entries:
        if entry.source is None:
            result.skipped.append((entry.position, f"no source to go back to ({entry.header(HEADER_SOURCE)!r})"))
        else:
            sourced.append(entry)
    if not sourced:
        return result
    with db.connect(settings) as conn, conn.transaction():
        if dry_run:
            done = {row[0] for row in conn.execute("SELECT entry FROM quarantine_redrives WHERE entry = ANY(%s)",
                                                   ([e.identity for e in sourced],)).fetchall()}
            for entry in sourced:
                if entry.identity in done:
                    result.skipped.append((entry.position, "redriven already"))
                else:
                    result.redriven.append(entry.position)
            return result
        fresh = {row[0] for row in conn.execute(RECORD_REDRIVES, (
            [e.identity for e in sourced], [e.header(HEADER_SOURCE) for e in sourced])).fetchall()}
        producer = clients.producer(settings)
        failures: list[str] = []
        chosen = [e for e in sourced if e.identity in fresh]
        for entry in sourced:
            if entry.identity not in fresh:
                result.skipped.append((entry.position, "redriven already"))
        for entry in chosen:
            source = entry.source
            assert source is not None
            headers: dict[str, str | bytes | None] = {  # the record's own headers, without the quarantine's
                **{k: v for k, v in entry.record.headers.items() if k not in QUARANTINE_HEADERS},
                HEADER_REDRIVEN: f"{datetime.datetime.now(datetime.UTC).isoformat()} {entry.identity}"}
            producer.produce(source[0], value=entry.record.value, key=entry.record.key, headers=headers,
                             on_delivery=lambda error, _m: failures.append(str(error)) if error else None)
        remaining = producer.flush(FLUSH_TIMEOUT_S)
        if remaining or failures:
            # Nothing recorded: the transaction rolls back, and a second redrive tries them all again (what did
            # get through is then a duplicate the stage drops or a task already claimed).
            raise QuarantineError(f"Kafka did not take {remaining + len(failures)} of {len(chosen)} record(s): "
                                  f"{failures[:1] or 'not acknowledged in time'}; nothing recorded, retry")
        result.redriven.extend(entry.position for entry in chosen)
    return result


def run_invalid_cli(settings: Settings, action: str, filters: Sequence[str], position: str | None,
                    since: str | None, until: str | None, dry_run: bool, as_json: bool) -> int:
    chosen = select(read(settings), parse_filters(filters), since=parse_time(since, "--since"),
                    until=parse_time(until, "--until"), position=position)
    if action == "list":
        for entry in chosen:
            summary = entry.summary()
            print(json.dumps(summary) if as_json else
                  f"{summary['position']:>8}  {summary['quarantined_at'][:19]:19}  {summary['stage']:12} "
                  f"{summary['reason']:16} {summary['source']:36} {summary['detail'][:70]}")
        if not as_json:
            print(f"{len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'}")
        return 0
    if action == "show":
        if not chosen:
            raise QuarantineError("no entry matches (give --position P:O or a --filter)")
        codec = serde.serde(settings)
        for entry in chosen:
            print(json.dumps(entry.details(codec), indent=2, default=str))
        return 0
    result = redrive(settings, chosen, dry_run=dry_run)
    print(f"{'would redrive' if dry_run else 'redriven'}: {len(result.redriven)}; skipped: {len(result.skipped)}")
    for where, why in result.skipped:
        print(f"  skipped {where}: {why}")
    return 0
