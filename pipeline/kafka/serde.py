"""Avro encoding of the pipeline's records (schemas/*.avsc): the serializer of every producer and consumer.

Wire formats:
- default: Avro single-object encoding, `C3 01` + the 8-byte little-endian CRC-64-AVRO fingerprint of the
  writer schema's Parsing Canonical Form + the Avro binary body. Anyone holding schemas/ can decode it.
- when a schema registry is configured: Confluent framing, `00` + 4-byte big-endian schema id + Avro binary
  body, with the record's full name as subject (RecordNameStrategy).

Decoding accepts both, finds the writer schema (the current one, any released version in
schemas/history/<Name>/<n>.avsc, or the registry's) and resolves the record to the current schema, so data
written by older versions stays readable. Bytes that are not one of our records raise DecodeError, and nothing
else. Values decode with timestamps as timezone-aware UTC datetimes and uuid fields as uuid.UUID.

The schema files and their release history (schemas/history, `freeze`, `check_history`) are pipeline.kafka.schemas.
"""

from __future__ import annotations

import datetime
import io
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import expand_schema
from fastavro.validation import ValidationError, validate

from pipeline.config import Settings
from pipeline.errors import DecodeError, NotifyError
from pipeline.kafka.schemas import (
    SCHEMAS_DIR,
    SchemaError,
    SchemaVersion,
    current_schemas,
    parse_schema_text,
    released_schemas,
)

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import SchemaRegistryClient

NOTIFICATION_REQUEST = "NotificationRequest"
DELIVERY_EVENT = "DeliveryEvent"
USER_SETTINGS = "UserSettings"
DELIVERY_TASK = "DeliveryTask"
PROVIDER_RECEIPT = "ProviderReceipt"
RECORDS = (NOTIFICATION_REQUEST, DELIVERY_EVENT, USER_SETTINGS, DELIVERY_TASK, PROVIDER_RECEIPT)

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
SINGLE_OBJECT_HEADER_LEN = 10  # magic + 8-byte fingerprint
CONFLUENT_MAGIC = 0
CONFLUENT_HEADER_LEN = 5  # magic + 4-byte schema id

_TIMESTAMP_TYPES = ("timestamp-millis", "timestamp-micros")


class EncodeError(NotifyError):
    """A value that does not fit its record's schema, or a record name that has no schema."""


class RegistryError(NotifyError):
    """The schema registry failed or refused; the bytes may be fine, so retry rather than quarantine."""


class Decoded(NamedTuple):
    record: str  # short record name, e.g. "NotificationRequest"
    value: dict[str, Any]


def _logical_parts(schema: Any) -> Any:
    """The parts of an expanded schema that lead to uuid or timestamp values (None if none), so that checking
    a value visits only those."""
    if isinstance(schema, list):
        branches = [_logical_parts(branch) for branch in schema]
        return branches if any(b is not None for b in branches) else None
    if not isinstance(schema, dict):
        return None
    if schema.get("logicalType") == "uuid" or schema.get("logicalType") in _TIMESTAMP_TYPES:
        return schema
    kind = schema.get("type")
    if kind == "record":
        parts = [(f, _logical_parts(f["type"])) for f in schema["fields"]]
        fields = [{**f, "type": part} for f, part in parts if part is not None]
        return {**schema, "fields": fields} if fields else None
    key = {"array": "items", "map": "values"}.get(str(kind))
    if key is not None:
        part = _logical_parts(schema[key])
        return {**schema, key: part} if part is not None else None
    return None


def _logical_problems(schema: Any, value: Any, where: str) -> Iterator[str]:
    """What fastavro's writer would let through silently: non-UUID strings in uuid fields and naive datetimes
    (fastavro would take them as UTC)."""
    if isinstance(schema, list):
        branches = [b for b in schema if b not in ("null", None)]  # None: a pruned branch
        if value is not None and len(branches) == 1 and len(schema) == 2:  # our unions are all "nullable X"
            yield from _logical_problems(branches[0], value, where)
        return
    if not isinstance(schema, dict):
        return
    logical = schema.get("logicalType")
    kind = schema.get("type")
    if logical == "uuid" and isinstance(value, str):
        try:
            uuid.UUID(value)
        except ValueError:
            yield f"{where} is not a UUID"
    elif logical in _TIMESTAMP_TYPES and isinstance(value, datetime.datetime) and value.tzinfo is None:
        yield f"{where} is a naive datetime; give a timezone-aware one"
    elif kind == "record" and isinstance(value, Mapping):
        for field in schema["fields"]:
            if field["name"] in value:
                yield from _logical_problems(field["type"], value[field["name"]], f"{where}.{field['name']}")
    elif kind == "array" and isinstance(value, Sequence) and not isinstance(value, str | bytes):
        for index, item in enumerate(value):
            yield from _logical_problems(schema["items"], item, f"{where}[{index}]")
    elif kind == "map" and isinstance(value, Mapping):
        for key, item in value.items():
            yield from _logical_problems(schema["values"], item, f"{where}[{key!r}]")


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AvroSerde:
    """Encodes and decodes our records; with `registry`, in Confluent framing (decoding accepts both).

    Registry calls are blocking HTTP, made once per schema (ids are cached).
    """

    def __init__(self, schemas_dir: Path = SCHEMAS_DIR, registry: SchemaRegistryClient | None = None) -> None:
        self._current = current_schemas(schemas_dir)
        self._by_full_name = {schema.full_name: name for name, schema in self._current.items()}
        self._logical = {name: _logical_parts(expand_schema(s.parsed)) for name, s in self._current.items()}
        # Writers by fingerprint: the current schemas and every release.
        self._writers = {schema.fingerprint: schema for schema in self._current.values()}
        for versions in released_schemas(schemas_dir).values():
            for version in versions:
                self._writers.setdefault(version.fingerprint, version)
        self._registry = registry
        self._registry_ids: dict[str, int] = {}  # record name -> id of its current schema
        self._registry_writers: dict[int, tuple[str, dict[str, Any]]] = {}  # id -> (record name, parsed)

    @property
    def records(self) -> tuple[str, ...]:
        return tuple(self._current)

    @property
    def registry(self) -> SchemaRegistryClient | None:
        """The schema registry in use; None for single-object encoding."""
        return self._registry

    def schema(self, record_name: str) -> SchemaVersion:
        """The current schema of a record."""
        return self._current[record_name]

    def encode(self, record_name: str, value: Mapping[str, Any], *, trusted: bool = False) -> bytes:
        """Encode `value` as a `record_name`; EncodeError if it does not fit, RegistryError if the registry
        fails.

        `trusted`: the value was built by the pipeline itself from decoded records (an event, a task), so the
        validation that names what is wrong is skipped, and run only if the writer refuses it. Values from outside
        (the API, upstream producers) are never trusted: the writer lets a naive datetime or a non-UUID string
        through silently, which validation catches.
        """
        schema = self._current.get(record_name)
        if schema is None:
            raise EncodeError(f"no schema for record {record_name!r}; known: {', '.join(self._current)}")
        body = self._trusted_body(schema, value) if trusted else self._body(schema, dict(value))
        if self._registry is None:
            return SINGLE_OBJECT_MAGIC + schema.fingerprint + body
        return bytes([CONFLUENT_MAGIC]) + self._registry_id(schema).to_bytes(4, "big") + body

    def decode(self, data: bytes, expected: str | None = None) -> Decoded:
        """Decode one record, resolved to the current schema; DecodeError for anything that is not one of ours
        (or not `expected`, when given). RegistryError when the registry fails on a schema id."""
        if expected is not None and expected not in self._current:
            raise ValueError(f"no schema for record {expected!r}")
        if not data:
            raise DecodeError("empty", "no bytes (an empty message or a tombstone)")
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < SINGLE_OBJECT_HEADER_LEN:
                raise DecodeError("truncated", f"{len(data)} bytes, shorter than the single-object header")
            writer = self._writers.get(data[2:SINGLE_OBJECT_HEADER_LEN])
            if writer is None:
                fingerprint = data[2:SINGLE_OBJECT_HEADER_LEN].hex()
                raise DecodeError("unknown_fingerprint", f"no schema of ours has fingerprint {fingerprint}")
            name, writer_schema, body = writer.name, writer.parsed, data[SINGLE_OBJECT_HEADER_LEN:]
        elif data[0] == CONFLUENT_MAGIC:
            if len(data) < CONFLUENT_HEADER_LEN:
                raise DecodeError("truncated", f"{len(data)} bytes, shorter than the Confluent header")
            if self._registry is None:
                raise DecodeError("no_registry", "Confluent framing, but no schema registry is configured")
            name, writer_schema = self._registry_writer(int.from_bytes(data[1:CONFLUENT_HEADER_LEN], "big"))
            body = data[CONFLUENT_HEADER_LEN:]
        elif data == SINGLE_OBJECT_MAGIC[:1]:
            raise DecodeError("truncated", "1 byte, shorter than the single-object header")
        else:
            raise DecodeError("unknown_magic", f"starts with {data[:2].hex()}: neither C301 nor 00")
        if expected is not None and name != expected:
            raise DecodeError("unexpected_record", f"a {name}, expected a {expected}")
        return Decoded(name, self._read(name, body, writer_schema))

    def _body(self, schema: SchemaVersion, value: dict[str, Any]) -> bytes:
        # raise_errors=True costs 4x (it raises for every union branch it tries): only to say what is wrong.
        if not validate(value, schema.parsed, raise_errors=False):
            try:
                validate(value, schema.parsed, raise_errors=True)
            except ValidationError as exc:
                raise EncodeError(f"{schema.name}: {_short('; '.join(map(str, exc.errors)))}") from None
        logical = self._logical[schema.name]
        problems = list(_logical_problems(logical, value, schema.name)) if logical is not None else []
        if problems:
            raise EncodeError(f"{schema.name}: {'; '.join(problems)}")
        buffer = io.BytesIO()
        try:
            # strict_allow_default: an unknown key (a typo) fails instead of being dropped silently.
            fastavro.schemaless_writer(buffer, schema.parsed, value, strict_allow_default=True)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise EncodeError(f"{schema.name}: {_short(str(exc))}") from None
        return buffer.getvalue()

    def _trusted_body(self, schema: SchemaVersion, value: Mapping[str, Any]) -> bytes:
        buffer = io.BytesIO()
        try:
            fastavro.schemaless_writer(buffer, schema.parsed, value, strict_allow_default=True)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
            return self._body(schema, dict(value))  # says what is wrong
        return buffer.getvalue()

    def _read(self, name: str, body: bytes, writer_schema: dict[str, Any]) -> dict[str, Any]:
        reader_schema = self._current[name].parsed
        buffer = io.BytesIO(body)
        try:
            value = fastavro.schemaless_reader(
                buffer, writer_schema, None if writer_schema is reader_schema else reader_schema
            )
        except SchemaResolutionError as exc:
            raise DecodeError("incompatible_schema", f"{name}: {_short(str(exc))}") from None
        except Exception as exc:  # hostile bytes make fastavro raise anything (EOFError, IndexError, ...)
            # A reader that failed at the end of the input ran out of bytes; elsewhere, the bytes are wrong.
            reason = "truncated" if buffer.tell() >= len(body) else "malformed_body"
            raise DecodeError(reason, f"{name}: {type(exc).__name__}: {_short(str(exc))}") from None
        if buffer.tell() != len(body):
            raise DecodeError("malformed_body", f"{name}: {len(body) - buffer.tell()} bytes after the record")
        if not isinstance(value, dict):
            raise DecodeError("malformed_body", f"{name}: not a record")
        return value

    def _registry_id(self, schema: SchemaVersion) -> int:
        schema_id = self._registry_ids.get(schema.name)
        if schema_id is None:
            from confluent_kafka.schema_registry import Schema

            assert self._registry is not None
            try:
                registered = Schema(json.dumps(schema.raw), "AVRO")
                schema_id = int(self._registry.register_schema(schema.full_name, registered))
            except Exception as exc:  # HTTP, auth or compatibility refusal: not the value's fault
                raise RegistryError(f"registering {schema.full_name} failed: {exc}") from exc
            self._registry_ids[schema.name] = schema_id
            self._registry_writers[schema_id] = (schema.name, schema.parsed)
        return schema_id

    def _registry_writer(self, schema_id: int) -> tuple[str, dict[str, Any]]:
        known = self._registry_writers.get(schema_id)
        if known is not None:
            return known
        from confluent_kafka.schema_registry import SchemaRegistryError

        assert self._registry is not None
        try:
            registered = self._registry.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise DecodeError("unknown_schema_id", f"schema id {schema_id} is not registered") from None
            raise RegistryError(f"schema registry lookup of id {schema_id} failed: {exc}") from exc
        except Exception as exc:  # connection errors, timeouts
            raise RegistryError(f"schema registry lookup of id {schema_id} failed: {exc}") from exc
        if registered.schema_type not in (None, "AVRO"):
            raise DecodeError("unknown_record", f"schema id {schema_id} is a {registered.schema_type} schema")
        try:
            writer = parse_schema_text(registered.schema_str or "", f"registry schema id {schema_id}")
        except SchemaError as exc:
            raise DecodeError("unknown_record", str(exc)) from None
        name = self._by_full_name.get(writer.full_name)
        if name is None:
            raise DecodeError("unknown_record", f"schema id {schema_id} is {writer.full_name}, not ours")
        local = self._writers.get(writer.fingerprint)  # our copy: no resolution when it is the current one
        known = (name, local.parsed if local is not None else writer.parsed)
        self._registry_writers[schema_id] = known
        return known


@cache
def serde(settings: Settings) -> AvroSerde:
    """The process-wide serializer for `settings`: Confluent framing when a registry URL is set."""
    registry = None
    if settings.schema_registry_url:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        # new_client gives the library's in-memory registry for mock:// URLs (tests), a REST client otherwise.
        registry = SchemaRegistryClient.new_client({"url": settings.schema_registry_url})
    return AvroSerde(SCHEMAS_DIR, registry)
