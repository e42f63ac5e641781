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

schemas/history is append-only: `freeze()` releases changed schemas into it, `check_history()` lists what is
wrong (unreleased changes, a schema that cannot read an older version, broken files).
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import expand_schema, to_parsing_canonical_form
from fastavro.schema import fingerprint as crc64_hex
from fastavro.utils import generate_many
from fastavro.validation import ValidationError, validate

from pipeline.config import REPO_ROOT, Settings
from pipeline.errors import DecodeError, NotifyError

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import SchemaRegistryClient

NAMESPACE = "io.notify.v1"
NOTIFICATION_REQUEST = "NotificationRequest"
DELIVERY_EVENT = "DeliveryEvent"
USER_SETTINGS = "UserSettings"
DELIVERY_TASK = "DeliveryTask"
PROVIDER_RECEIPT = "ProviderReceipt"
RECORDS = (NOTIFICATION_REQUEST, DELIVERY_EVENT, USER_SETTINGS, DELIVERY_TASK, PROVIDER_RECEIPT)

SCHEMAS_DIR = REPO_ROOT / "schemas"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
SINGLE_OBJECT_HEADER_LEN = 10  # magic + 8-byte fingerprint
CONFLUENT_MAGIC = 0
CONFLUENT_HEADER_LEN = 5  # magic + 4-byte schema id
COMPAT_SAMPLES = 50  # random records per (current, released) pair in the compatibility check

_VERSION_FILE = re.compile(r"[1-9][0-9]*\.avsc")
_TIMESTAMP_TYPES = ("timestamp-millis", "timestamp-micros")


class EncodeError(NotifyError):
    """A value that does not fit its record's schema, or a record name that has no schema."""


class SchemaError(NotifyError):
    """schemas/ itself is wrong: a file that does not parse or is misnamed, or an unsafe release."""


class RegistryError(NotifyError):
    """The schema registry failed or refused; the bytes may be fine, so retry rather than quarantine."""


class Decoded(NamedTuple):
    record: str  # short record name, e.g. "NotificationRequest"
    value: dict[str, Any]


@dataclass(frozen=True, eq=False)
class SchemaVersion:
    """One version of one record schema: the working copy in schemas/ or a release in schemas/history."""

    name: str  # short record name
    origin: str  # where it came from, for messages (a path, or a git revision and path)
    version: int | None  # release number; None for the working copy
    # The JSON as written, docs included (what a registry receives); fastavro's parsed form; the CRC-64-AVRO
    # fingerprint of the Parsing Canonical Form (8 bytes, little-endian).
    raw: dict[str, Any] = dataclasses.field(repr=False)
    parsed: dict[str, Any] = dataclasses.field(repr=False)
    fingerprint: bytes = dataclasses.field(repr=False)

    @property
    def full_name(self) -> str:
        return str(self.parsed["name"])


def schema_fingerprint(parsed: dict[str, Any]) -> bytes:
    """The single-object-encoding fingerprint of a parsed schema (fastavro's hex is already little-endian)."""
    return bytes.fromhex(crc64_hex(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


def parse_schema_text(text: str, origin: str, version: int | None = None) -> SchemaVersion:
    """Parse one record schema from its JSON text; SchemaError if it is not a valid Avro record."""
    try:
        raw = json.loads(text)
        parsed = fastavro.parse_schema(raw, {})  # a fresh name table: every file stands alone
    except (ValueError, TypeError, KeyError, fastavro.schema.SchemaParseException) as exc:
        raise SchemaError(f"{origin}: not a valid Avro schema: {exc}") from exc
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise SchemaError(f"{origin}: the top-level type must be a record")
    name = str(parsed["name"]).rpartition(".")[2]
    return SchemaVersion(name, origin, version, raw, parsed, schema_fingerprint(parsed))


def _load(path: Path, schemas_dir: Path, version: int | None) -> SchemaVersion:
    base = schemas_dir.parent
    origin = str(path.relative_to(base)) if path.is_relative_to(base) else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{origin}: unreadable: {exc}") from exc
    return parse_schema_text(text, origin, version)


def _scan_current(schemas_dir: Path) -> tuple[dict[str, SchemaVersion], list[str]]:
    """The working copies schemas/<Name>.avsc, and what is wrong with them."""
    current: dict[str, SchemaVersion] = {}
    problems: list[str] = []
    for path in sorted(schemas_dir.glob("*.avsc")):
        try:
            schema = _load(path, schemas_dir, None)
        except SchemaError as exc:
            problems.append(str(exc))
            continue
        if schema.full_name != f"{NAMESPACE}.{path.stem}":
            problems.append(f"{schema.origin}: defines {schema.full_name}, expected {NAMESPACE}.{path.stem}")
            continue
        current[schema.name] = schema
    return current, problems


def _scan_history(schemas_dir: Path) -> tuple[dict[str, list[SchemaVersion]], list[str]]:
    """The releases schemas/history/<Name>/<n>.avsc, oldest first, and what is wrong with them."""
    released: dict[str, list[SchemaVersion]] = {}
    problems: list[str] = []
    root = schemas_dir / "history"
    if not root.is_dir():
        return released, problems
    for record_dir in sorted(root.iterdir()):
        if not record_dir.is_dir():
            problems.append(f"{record_dir}: expected only record folders in {root}")
            continue
        versions: list[SchemaVersion] = []
        for path in sorted(record_dir.iterdir()):
            if not _VERSION_FILE.fullmatch(path.name):
                problems.append(f"{path}: release files are named <n>.avsc (1, 2, ...)")
                continue
            try:
                schema = _load(path, schemas_dir, int(path.stem))
            except SchemaError as exc:
                problems.append(str(exc))
                continue
            if schema.full_name != f"{NAMESPACE}.{record_dir.name}":
                expected = f"{NAMESPACE}.{record_dir.name}"
                problems.append(f"{schema.origin}: defines {schema.full_name}, expected {expected}")
                continue
            versions.append(schema)
        versions.sort(key=lambda v: v.version or 0)
        numbers = [v.version for v in versions]
        if numbers != list(range(1, len(versions) + 1)):
            problems.append(f"{record_dir}: releases must be numbered 1..n without gaps, found {numbers}")
        fingerprints = [v.fingerprint for v in versions]
        if len(set(fingerprints)) != len(fingerprints):
            problems.append(f"{record_dir}: the same schema is released twice")
        released[record_dir.name] = versions
    return released, problems


def current_schemas(schemas_dir: Path = SCHEMAS_DIR) -> dict[str, SchemaVersion]:
    """Working copies by record name; SchemaError if any file is broken."""
    current, problems = _scan_current(schemas_dir)
    if problems:
        raise SchemaError("; ".join(problems))
    return current


def released_schemas(schemas_dir: Path = SCHEMAS_DIR) -> dict[str, list[SchemaVersion]]:
    """Releases by record name, oldest first; SchemaError if any file is broken."""
    released, problems = _scan_history(schemas_dir)
    if problems:
        raise SchemaError("; ".join(problems))
    return released


def compatibility_problems(
    reader: SchemaVersion, writer: SchemaVersion, samples: int = COMPAT_SAMPLES
) -> list[str]:
    """Whether `reader` reads random records written with `writer` (Avro schema resolution); [] if it does."""
    for datum in generate_many(writer.parsed, samples):
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, writer.parsed, datum)
        buffer.seek(0)
        try:
            fastavro.schemaless_reader(buffer, writer.parsed, reader.parsed)
        except Exception as exc:  # any failure to resolve means "incompatible"; the message says why
            why = f"{type(exc).__name__}: {exc}"
            return [f"{reader.origin} cannot read data written with {writer.origin}: {why}"]
    return []


def _default_problems(schema: Any, where: str) -> Iterator[str]:
    """Union defaults must match the union's first branch (the Avro spec; fastavro accepts any branch, Java
    tools reject the schema). `schema` is expanded (named types inlined)."""
    if isinstance(schema, list):
        for branch in schema:
            yield from _default_problems(branch, where)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "record":
            for field in schema["fields"]:
                at = f"{where}.{field['name']}"
                field_type = field["type"]
                if (isinstance(field_type, list) and field_type and "default" in field
                        and not validate(field["default"], field_type[0], raise_errors=False)):
                    yield f"{at}: the default must match the union's first type (put that type first)"
                yield from _default_problems(field_type, at)
        elif kind == "array":
            yield from _default_problems(schema["items"], where)
        elif kind == "map":
            yield from _default_problems(schema["values"], where)


def _named_definitions(schema: Any) -> Iterator[dict[str, Any]]:
    """Every named type (record, enum, fixed) in an expanded schema."""
    if isinstance(schema, list):
        for branch in schema:
            yield from _named_definitions(branch)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "enum", "fixed"):
            yield schema
        for field in schema.get("fields", []):
            yield from _named_definitions(field["type"])
        for key in ("items", "values"):
            if key in schema:
                yield from _named_definitions(schema[key])


def _definition_text(definition: Any) -> str:
    """A named type's full definition (docs and defaults included) as comparable text."""
    def public(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: public(v) for k, v in node.items() if not k.startswith("__")}  # fastavro's own keys
        if isinstance(node, list):
            return [public(item) for item in node]
        return node

    return json.dumps(public(definition), sort_keys=True)


def check_history(schemas_dir: Path = SCHEMAS_DIR, samples: int = COMPAT_SAMPLES) -> list[str]:
    """Everything wrong with schemas/ and its release history, as messages; [] when all is well."""
    current, problems = _scan_current(schemas_dir)
    released, history_problems = _scan_history(schemas_dir)
    problems += history_problems
    problems += [f"schemas/history/{name}: released, but schemas/{name}.avsc is gone" for name in released
                 if name not in current]
    # Named types shared by several files (NotificationType, Channel, ...) must be defined alike everywhere.
    definitions: dict[str, tuple[str, str]] = {}  # full name -> (definition, first file defining it)
    for name, schema in current.items():
        expanded = expand_schema(schema.parsed)
        problems += [f"{schema.origin}: {p}" for p in _default_problems(expanded, schema.name)]
        for definition in _named_definitions(expanded):
            text = _definition_text(definition)
            first = definitions.setdefault(definition["name"], (text, schema.origin))
            if first[0] != text:
                problems.append(f"{definition['name']} differs between {first[1]} and {schema.origin}; "
                                "define it alike")
        versions = released.get(name, [])
        if schema.fingerprint not in {v.fingerprint for v in versions}:
            problems.append(f"{schema.origin} changed since its last release (or was never released): "
                            "run `notify schemas freeze` to release it")
        for version in versions:
            problems += compatibility_problems(schema, version, samples)
    return problems


def freeze(schemas_dir: Path = SCHEMAS_DIR, samples: int = COMPAT_SAMPLES) -> list[Path]:
    """Release every changed schema: copy schemas/<Name>.avsc to schemas/history/<Name>/<next n>.avsc.

    Returns the files written. Writes nothing and raises SchemaError when schemas/ is broken or a changed
    schema cannot read data of a released version (that needs a new record name, not a release).
    """
    current, problems = _scan_current(schemas_dir)
    released, history_problems = _scan_history(schemas_dir)
    problems += history_problems
    plan: list[tuple[Path, Path]] = []
    for name, schema in current.items():
        versions = released.get(name, [])
        if schema.fingerprint in {v.fingerprint for v in versions}:
            continue
        problems += [f"{schema.origin}: {p}" for p in _default_problems(expand_schema(schema.parsed), name)]
        for version in versions:
            problems += compatibility_problems(schema, version, samples)
        target = schemas_dir / "history" / name / f"{len(versions) + 1}.avsc"
        plan.append((schemas_dir / f"{name}.avsc", target))
    if problems:
        raise SchemaError("nothing frozen:\n" + "\n".join(problems))
    for source, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return [target for _, target in plan]


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
