"""pipeline.state.migrate against the real PostgreSQL, each test on a throwaway database of its own."""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pipeline.config import Settings
from pipeline.errors import MigrationError
from pipeline.state import db, migrate

TABLES = {
    "schema_migrations", "notifications", "deliveries", "notification_attempts", "user_notification_settings"}


@pytest.fixture
def fresh_settings(settings: Settings, unique: str) -> Iterator[Settings]:
    """Settings pointing at a new, empty database, dropped after the test."""
    name = f"notify_test_{unique}"
    with db.connect(settings, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield dataclasses.replace(settings, database_url=make_conninfo(settings.dsn, dbname=name))
    finally:
        with db.connect(settings, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def query(settings: Settings, statement: str) -> list[tuple[object, ...]]:
    with db.connect(settings) as conn:
        return conn.execute(statement.encode()).fetchall()


def write_migrations(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def test_migrations_on_an_empty_database_create_every_table_and_record_every_version(
        fresh_settings: Settings) -> None:
    expected = migrate.discover()
    assert [m.filename for m in migrate.pending(fresh_settings)] == [m.filename for m in expected]

    applied = migrate.migrate(fresh_settings)

    assert applied == [m.version for m in expected]
    tables = {row[0] for row in query(fresh_settings,
                                      "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert tables >= TABLES
    recorded = query(fresh_settings, "SELECT version, name, checksum, execution_ms FROM schema_migrations")
    assert sorted((v, n, c) for v, n, c, _ in recorded) == [(m.version, m.name, m.checksum) for m in expected]
    assert all(isinstance(ms, int) and ms >= 0 for *_, ms in recorded)
    assert migrate.pending(fresh_settings) == []


def test_every_table_says_what_it_is_for(fresh_settings: Settings) -> None:
    migrate.migrate(fresh_settings)
    rows = query(fresh_settings, "SELECT relname, obj_description(oid, 'pg_class') FROM pg_class "
                                 "WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace")
    comments = {name: comment for name, comment in rows}
    assert all(comments.get(table) for table in TABLES), comments


def test_a_second_run_applies_nothing_and_changes_no_record(fresh_settings: Settings) -> None:
    migrate.migrate(fresh_settings)
    before = query(fresh_settings, "SELECT * FROM schema_migrations ORDER BY version")

    assert migrate.migrate(fresh_settings) == []
    assert query(fresh_settings, "SELECT * FROM schema_migrations ORDER BY version") == before


def test_an_applied_migration_whose_file_changed_raises_naming_it_and_is_not_rerun(
        fresh_settings: Settings) -> None:
    migrate.migrate(fresh_settings)
    first = migrate.discover()[0]
    with db.connect(fresh_settings) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = repeat('0', 64) WHERE version = %s",
                     (first.version,))
    before = query(fresh_settings, "SELECT * FROM schema_migrations ORDER BY version")

    with pytest.raises(MigrationError, match=re.escape(first.filename)):
        migrate.migrate(fresh_settings)
    with pytest.raises(MigrationError, match=re.escape(first.filename)):
        migrate.pending(fresh_settings)
    assert query(fresh_settings, "SELECT * FROM schema_migrations ORDER BY version") == before


def test_concurrent_runs_apply_each_migration_exactly_once(fresh_settings: Settings) -> None:
    runners = 4
    start = threading.Barrier(runners)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        start.wait()
        try:
            results.append(migrate.migrate(fresh_settings))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(runners)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert errors == []
    versions = [m.version for m in migrate.discover()]
    assert sorted(v for applied in results for v in applied) == versions  # each applied by exactly one runner
    recorded = query(fresh_settings, "SELECT version FROM schema_migrations ORDER BY 1")
    assert [row[0] for row in recorded] == versions


def test_a_runner_gives_up_with_migration_error_when_another_holds_the_lock_too_long(
        fresh_settings: Settings) -> None:
    with db.connect(fresh_settings, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrate.ADVISORY_LOCK_KEY,))
        with pytest.raises(MigrationError, match="lock"):
            migrate.migrate(fresh_settings, lock_timeout_s=0.2)
    assert migrate.migrate(fresh_settings) != []


def test_a_failing_migration_is_rolled_back_and_not_recorded_while_earlier_ones_stay(
        fresh_settings: Settings, tmp_path: Path) -> None:
    directory = write_migrations(tmp_path / "m", {
        "0001_first.sql": "CREATE TABLE first_table (id int);",
        "0002_broken.sql": "CREATE TABLE half_done (id int);\nSELECT 1 / 0;",
    })

    with pytest.raises(MigrationError, match=re.escape("0002_broken.sql")):
        migrate.migrate(fresh_settings, directory)

    assert query(fresh_settings, "SELECT version FROM schema_migrations") == [("0001",)]
    assert query(fresh_settings, "SELECT to_regclass('first_table') IS NOT NULL, "
                                 "to_regclass('half_done') IS NOT NULL") == [(True, False)]
    (directory / "0002_broken.sql").write_text("CREATE TABLE half_done (id int);")
    assert migrate.migrate(fresh_settings, directory) == ["0002"]


def test_a_migration_file_may_hold_many_statements_and_dollar_quoted_bodies(
        fresh_settings: Settings, tmp_path: Path) -> None:
    directory = write_migrations(tmp_path / "m", {"0001_many.sql": (
        "CREATE TABLE a (id int);\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END; $$;\n"
        "INSERT INTO a VALUES (f()), (2);  -- a trailing comment with a % sign\n")})

    assert migrate.migrate(fresh_settings, directory) == ["0001"]
    assert query(fresh_settings, "SELECT count(*) FROM a") == [(2,)]


def test_a_recorded_migration_missing_from_the_directory_is_refused(
        fresh_settings: Settings, tmp_path: Path) -> None:
    directory = write_migrations(tmp_path / "m", {"0001_a.sql": "SELECT 1;", "0002_b.sql": "SELECT 2;"})
    migrate.migrate(fresh_settings, directory)
    (directory / "0002_b.sql").unlink()

    with pytest.raises(MigrationError, match="0002_b"):
        migrate.migrate(fresh_settings, directory)


def test_a_new_migration_numbered_before_an_applied_one_is_refused(
        fresh_settings: Settings, tmp_path: Path) -> None:
    directory = write_migrations(tmp_path / "m", {"0001_a.sql": "SELECT 1;", "0003_c.sql": "SELECT 3;"})
    migrate.migrate(fresh_settings, directory)
    write_migrations(directory, {"0002_b.sql": "SELECT 2;"})

    with pytest.raises(MigrationError, match=re.escape("0002_b.sql")):
        migrate.migrate(fresh_settings, directory)
    assert [row[0] for row in query(fresh_settings, "SELECT version FROM schema_migrations ORDER BY 1")] == [
        "0001", "0003"]


@pytest.mark.parametrize("files, message", [
    ({"1_short.sql": "SELECT 1;"}, "1_short.sql"),
    ({"0001_Upper.sql": "SELECT 1;"}, "0001_Upper.sql"),
    ({"0001_a.sql": "SELECT 1;", "0001_b.sql": "SELECT 1;"}, "share version 0001"),
])
def test_misnamed_or_duplicate_migration_files_are_refused_before_anything_runs(
        tmp_path: Path, files: dict[str, str], message: str) -> None:
    with pytest.raises(MigrationError, match=re.escape(message)):
        migrate.discover(write_migrations(tmp_path / "m", files))


def test_the_checksum_ignores_line_endings_but_not_content() -> None:
    assert migrate.checksum(b"SELECT 1;\r\nSELECT 2;\r\n") == migrate.checksum(b"SELECT 1;\nSELECT 2;\n")
    assert migrate.checksum(b"SELECT 1;\n") != migrate.checksum(b"SELECT 2;\n")


def test_an_unreachable_database_is_a_migration_error_naming_where(settings: Settings) -> None:
    nowhere = dataclasses.replace(settings, database_url="postgresql://notify:notify@127.0.0.1:1/notify")

    with pytest.raises(MigrationError, match=re.escape("127.0.0.1:1/notify")):
        migrate.migrate(nowhere)
