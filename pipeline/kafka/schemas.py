"""The record schemas (schemas/*.avsc) and their released history (schemas/history/<Name>/<n>.avsc): parsing,
fingerprints, the compatibility checks, and `freeze`/`check_history`. The serializer (serde) reads them.

schemas/history is append-only: `freeze()` releases changed schemas into it, `check_history()` lists what is
wrong (unreleased changes, a schema that cannot read an older version, broken files).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import expand_schema, to_parsing_canonical_form
from fastavro.schema import fingerprint as crc64_hex
from fastavro.utils import generate_many
from fastavro.validation import validate

from pipeline.config import REPO_ROOT
from pipeline.errors import NotifyError

NAMESPACE = "io.notify.v1"
SCHEMAS_DIR = REPO_ROOT / "schemas"
COMPAT_SAMPLES = 50  # random records per (current, released) pair in the compatibility check

_VERSION_FILE = re.compile(r"[1-9][0-9]*\.avsc")


class SchemaError(NotifyError):
    """schemas/ itself is wrong: a file that does not parse or is misnamed, or an unsafe release."""


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
