"""Schema migrations: the SQL files of infra/migrations/, applied in order and recorded.

A migration is `NNNN_name.sql`. Each runs in its own transaction together with its row in
`schema_migrations` (version, name, sha256 checksum, applied_at, execution_ms), so it is applied completely
or not at all. A session-level advisory lock serialises runners: `notify stack up`, `notify migrate` and tests
may start at once, and each migration still runs exactly once. An applied migration is never re-run; if its
file changed since, the run stops with MigrationError naming it: the database no longer matches the file.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.rows import TupleRow

from pipeline.config import REPO_ROOT, Settings
from pipeline.errors import MigrationError
from pipeline.state import db

log = logging.getLogger(__name__)

MIGRATIONS_DIR = REPO_ROOT / "infra" / "migrations"
MIGRATION_FILE = re.compile(r"^(?P<version>[0-9]{4})_(?P<name>[a-z0-9][a-z0-9_]*)\.sql$")
# Fixed key of the advisory lock that serialises runners (the bytes of "notifymg" as a bigint). Advisory locks
# are per database, so runners on different databases never wait for each other.
ADVISORY_LOCK_KEY = int.from_bytes(b"notifymg", "big")
DEFAULT_LOCK_TIMEOUT_S = 120.0

# Created by the runner itself, under the lock, before it reads what is applied.
BOOKKEEPING_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version      text        PRIMARY KEY CHECK (version ~ '^[0-9]{4}$'),
    name         text        NOT NULL,
    checksum     text        NOT NULL CHECK (checksum ~ '^[0-9a-f]{64}$'),
    applied_at   timestamptz NOT NULL DEFAULT now(),
    execution_ms integer     NOT NULL CHECK (execution_ms >= 0)
);
COMMENT ON TABLE schema_migrations IS
    'Migrations of infra/migrations/ applied to this database by pipeline/state/migrate.py; checksum is the '
    'sha256 of the file as applied.';
"""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path
    sql: str
    checksum: str

    @property
    def filename(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class AppliedMigration:
    version: str
    name: str
    checksum: str


def checksum(sql: bytes) -> str:
    """sha256 of a migration file; line endings are normalised so a CRLF checkout is not an edit."""
    return hashlib.sha256(sql.replace(b"\r\n", b"\n")).hexdigest()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in `directory`, in version order; a misnamed .sql file or a reused version is an
    error."""
    migrations: dict[str, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = MIGRATION_FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lowercase_name.sql")
        version = match["version"]
        if version in migrations:
            raise MigrationError(f"{path.name} and {migrations[version].filename} share version {version}")
        raw = path.read_bytes()
        migrations[version] = Migration(version, match["name"], path, raw.decode("utf-8"), checksum(raw))
    return [migrations[v] for v in sorted(migrations)]


def plan(available: list[Migration], applied: list[AppliedMigration]) -> list[Migration]:
    """What is left to apply, after checking that what was applied still matches the files."""
    files = {m.version: m for m in available}
    edited = [files[a.version] for a in applied
              if a.version in files and files[a.version].checksum != a.checksum]
    if edited:
        names = ", ".join(m.filename for m in edited)
        raise MigrationError(
            f"applied migration(s) changed since they ran: {names}. An applied migration is never re-run: "
            "restore the file and put the change in a new migration.")
    missing = [a for a in applied if a.version not in files]
    if missing:
        names = ", ".join(f"{a.version}_{a.name}" for a in missing)
        raise MigrationError(f"the database has migration(s) that infra/migrations/ lacks: {names} "
                             "(applied by newer code?)")
    done = {a.version for a in applied}
    todo = [m for m in available if m.version not in done]
    if todo and done and todo[0].version < max(done):
        raise MigrationError(f"{todo[0].filename} is older than applied migration {max(done)}: "
                             "give it a version after the last applied one")
    return todo


def migrate(settings: Settings, directory: Path = MIGRATIONS_DIR, *,
            lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> list[str]:
    """Apply the pending migrations in order; return the versions applied now (empty when nothing to do)."""
    available = discover(directory)
    applied_now: list[str] = []
    try:
        with _locked_session(settings, lock_timeout_s) as conn:
            for migration in plan(available, _applied(conn)):
                _apply(conn, migration)
                applied_now.append(migration.version)
    except psycopg.Error as exc:  # e.g. the connection dropped, or no right to create schema_migrations
        done = ", ".join(applied_now) or "nothing"
        raise MigrationError(f"migrating {db.describe(settings)} failed (applied: {done}): {exc}") from exc
    return applied_now


def pending(settings: Settings, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations not applied yet (read-only: takes no lock and creates nothing)."""
    available = discover(directory)
    try:
        with _connect(settings) as conn:
            exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
            applied = _applied(conn) if exists and exists[0] else []
    except psycopg.Error as exc:
        raise MigrationError(f"reading the migrations of {db.describe(settings)} failed: {exc}") from exc
    return plan(available, applied)


def _connect(settings: Settings) -> psycopg.Connection[TupleRow]:
    try:
        return db.connect(settings, autocommit=True)
    except psycopg.OperationalError as exc:
        raise MigrationError(f"cannot connect to PostgreSQL at {db.describe(settings)}: {exc}") from exc


@contextmanager
def _locked_session(settings: Settings, lock_timeout_s: float) -> Iterator[psycopg.Connection[TupleRow]]:
    """An autocommit session holding the migration lock, with schema_migrations in place."""
    with _connect(settings) as conn:
        # DDL on a big table may legitimately run longer than the pipeline's statement timeout.
        conn.execute("SET statement_timeout = 0")
        conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(lock_timeout_s * 1000)}ms",))
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        except psycopg.errors.LockNotAvailable as exc:
            raise MigrationError(
                f"another migration runner has held the lock on {db.describe(settings)} for over "
                f"{lock_timeout_s:g} s") from exc
        conn.execute("RESET lock_timeout")
        # Closing the session releases the lock, also when a migration fails.
        with conn.transaction():
            conn.execute(BOOKKEEPING_DDL)
        yield conn


def _applied(conn: psycopg.Connection[TupleRow]) -> list[AppliedMigration]:
    rows = conn.execute("SELECT version, name, checksum FROM schema_migrations ORDER BY version").fetchall()
    return [AppliedMigration(*row) for row in rows]


def _apply(conn: psycopg.Connection[TupleRow], migration: Migration) -> None:
    started = time.monotonic()
    try:
        with conn.transaction():
            # Bytes: a file's text is not a literal, and without parameters it may hold many statements.
            conn.execute(migration.sql.encode("utf-8"))
            elapsed_ms = round((time.monotonic() - started) * 1000)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum, execution_ms)"
                " VALUES (%s, %s, %s, %s)",
                (migration.version, migration.name, migration.checksum, elapsed_ms))
    except psycopg.Error as exc:
        raise MigrationError(f"{migration.filename} failed and was rolled back: {exc}") from exc
    log.info("applied migration %s in %d ms", migration.filename, elapsed_ms)
