"""Schema changes stay backward compatible: each current schema reads data written by every released version
(schemas/history) and by its previous version in git, and every current schema is released.

"Previous version in git" is the newest committed content of schemas/<Name>.avsc that differs from the
working copy: the last commit's version while a change is uncommitted, the one before it once committed (CI).
A schema that git holds no other version of yet is checked against its releases only (asserted to exist).
"""

from __future__ import annotations

import io
import json
import subprocess
from typing import Any

import fastavro
import pytest
from fastavro.utils import generate_many

from pipeline.config import REPO_ROOT
from pipeline.kafka import schemas
from pipeline.kafka.schemas import SchemaVersion
from pipeline.kafka.serde import RECORDS

SAMPLES_PER_VERSION = 200
CURRENT = schemas.current_schemas()
RELEASED = schemas.released_schemas()


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=False)


def has_commits() -> bool:
    return git("rev-parse", "--verify", "--quiet", "HEAD").returncode == 0


def previous_git_version(name: str) -> SchemaVersion | None:
    """The newest committed schemas/<name>.avsc that differs from the working copy, if any."""
    if not has_commits():
        return None
    path = f"schemas/{name}.avsc"
    revisions = git("log", "--format=%H", "--", path)
    assert revisions.returncode == 0, revisions.stderr
    working_copy = (REPO_ROOT / path).read_text(encoding="utf-8")
    for revision in revisions.stdout.split():
        shown = git("show", f"{revision}:{path}")
        if shown.returncode != 0:  # the commit deleted the file
            continue
        if shown.stdout != working_copy:
            return schemas.parse_schema_text(shown.stdout, f"git {revision[:12]}:{path}")
    return None


def wire_type(schema: Any) -> str:
    """A field type without docs, to tell whether a field kept its type between two versions."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "doc" and not k.startswith("__")}
        if isinstance(node, list):
            return [strip(item) for item in node]
        return node

    return json.dumps(strip(schema), sort_keys=True)


def assert_reads(reader: SchemaVersion, writer: SchemaVersion) -> None:
    """Write random records with `writer`, read them with `reader`: fields both have, of the same type, keep
    their values; the others take the reader's defaults."""
    writer_fields = {f["name"]: f for f in writer.parsed["fields"]}
    reader_fields = {f["name"]: f for f in reader.parsed["fields"]}
    same_type = [n for n in reader_fields if n in writer_fields
                 and wire_type(reader_fields[n]["type"]) == wire_type(writer_fields[n]["type"])]
    for datum in generate_many(writer.parsed, SAMPLES_PER_VERSION):
        body = io.BytesIO()
        fastavro.schemaless_writer(body, writer.parsed, datum)
        as_written = fastavro.schemaless_reader(io.BytesIO(body.getvalue()), writer.parsed)
        try:
            as_read = fastavro.schemaless_reader(io.BytesIO(body.getvalue()), writer.parsed, reader.parsed)
        except Exception as exc:
            pytest.fail(f"{reader.origin} cannot read data written with {writer.origin}: {exc!r}")
        assert isinstance(as_written, dict) and isinstance(as_read, dict)
        assert set(as_read) == set(reader_fields)
        for name in same_type:
            assert as_read[name] == as_written[name], f"{name} changed reading {writer.origin} data"


def test_every_record_has_a_schema_and_a_release() -> None:
    assert set(CURRENT) == set(RECORDS)
    assert set(RELEASED) == set(RECORDS), "schemas/history must hold a release of every record"


@pytest.mark.parametrize("name", RECORDS)
def test_current_schema_is_released(name: str) -> None:
    released = {v.fingerprint for v in RELEASED.get(name, [])}
    assert CURRENT[name].fingerprint in released, (
        f"schemas/{name}.avsc changed since its last release: run `notify schemas freeze` to release it "
        "(it refuses changes that cannot read older data)"
    )


@pytest.mark.parametrize("name", RECORDS)
def test_current_schema_reads_every_older_version(name: str) -> None:
    older = list(RELEASED.get(name, []))
    from_git = previous_git_version(name)
    if from_git is not None:
        older.append(from_git)
    assert older, f"no older version of {name} to check against (schemas/history/{name} is empty)"
    for version in older:
        assert_reads(CURRENT[name], version)


def test_git_is_available_for_the_previous_version_check() -> None:
    """Without git the previous-version check would check nothing; fail instead."""
    inside = git("rev-parse", "--is-inside-work-tree")
    assert inside.returncode == 0 and inside.stdout.strip() == "true", inside.stderr


def test_released_versions_are_never_edited() -> None:
    """schemas/history is append-only: every committed release is still there, byte for byte."""
    if not has_commits():
        assert RELEASED, "nothing committed yet; the history on disk is all there is"
        return
    listed = git("ls-tree", "-r", "--name-only", "HEAD", "--", "schemas/history")
    assert listed.returncode == 0, listed.stderr
    for path in listed.stdout.split():
        committed = git("show", f"HEAD:{path}")
        assert committed.returncode == 0, committed.stderr
        on_disk = REPO_ROOT / path
        assert on_disk.is_file(), f"{path} was released and committed; it must not be deleted"
        assert on_disk.read_text(encoding="utf-8") == committed.stdout, f"{path} was released; never edit it"
