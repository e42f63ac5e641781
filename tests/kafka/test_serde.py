"""pipeline.kafka.serde: round trips in both wire formats, schema evolution, garbage; pipeline.kafka.schemas:
freeze/check of the history.

No broker and no registry server: the Confluent path uses the client library's in-memory `mock://` registry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from fastavro.schema import to_parsing_canonical_form
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import config
from pipeline.errors import DecodeError
from pipeline.kafka import schemas, serde
from pipeline.kafka.schemas import SchemaError
from pipeline.kafka.serde import (
    DELIVERY_EVENT,
    DELIVERY_TASK,
    NOTIFICATION_REQUEST,
    PROVIDER_RECEIPT,
    RECORDS,
    USER_SETTINGS,
    AvroSerde,
    EncodeError,
    RegistryError,
)

NOW = datetime(2025, 3, 4, 5, 6, 7, 890_000, tzinfo=UTC)  # millisecond precision, as timestamp-millis keeps
ID = uuid.UUID("0b5e8f0c-8d43-4a8e-9a51-2f1d3c4b5a69")
OTHER_ID = uuid.UUID("7f3c2a10-1b2c-4d5e-8f90-a1b2c3d4e5f6")
TOKEN = {"platform": "android", "token": "fcm-registration-token-1"}


def full_values() -> dict[str, dict[str, Any]]:
    """One value per record with every field set (as decoding returns them: UUIDs, aware datetimes)."""
    return {
        NOTIFICATION_REQUEST: {
            "notification_id": ID, "idempotency_key": "debit-8841", "user_id": "user-42",
            "type": "transaction", "channels": ["sms", "push"],
            "recipient": {"phone": "+2348012345678", "email": "ada@example.com", "device_tokens": [TOKEN]},
            "template_id": "debit_alert", "template_params": {"amount": "NGN 5,000.00", "balance": "NGN 9"},
            "content": None, "locale": "en-NG", "created_at": NOW, "expires_at": NOW + timedelta(minutes=5),
            "source_service": "core-banking", "correlation_id": "req-1", "collapse_key": "acct-1",
        },
        DELIVERY_EVENT: {
            "event_id": OTHER_ID, "notification_id": ID, "user_id": "user-42", "notification_type": "otp",
            "lane": "critical", "channel": "sms", "provider": "twilio", "status": "failed", "stage": "sender",
            "attempt": 2, "error_code": "21211", "error_message": "invalid 'To' number",
            "provider_latency_ms": 412, "cost_micros": 7_500, "currency": "USD", "occurred_at": NOW,
            "created_at": NOW - timedelta(seconds=3), "correlation_id": "req-1",
        },
        USER_SETTINGS: {
            "user_id": "user-42", "timezone": "Africa/Lagos", "channel_preference": ["push", "email", "sms"],
            "categories": {"marketing": {"opted_in_channels": ["email"], "opted_out_channels": ["sms"],
                                         "digest": "hourly"}},
            "quiet_hours": {"start": "22:00", "end": "07:00"}, "digest": "daily",
            "contacts": {"phone": "+2348012345678", "email": None, "device_tokens": [TOKEN, TOKEN]},
            "version": 7, "updated_at": NOW,
        },
        DELIVERY_TASK: {
            "notification_id": ID, "user_id": "user-42", "type": "security", "lane": "critical",
            "channel": "email", "address": "ada@example.com", "device_tokens": [], "template_id": None,
            "template_params": {},
            "content": {"subject": "New sign-in", "body": "A new device signed in to your account."},
            "locale": "en", "attempt": 3, "created_at": NOW, "expires_at": None, "correlation_id": None,
            "collapse_key": None,
        },
        PROVIDER_RECEIPT: {
            "provider": "sendgrid", "provider_message_id": "sg-abc.filter0001", "notification_id": ID,
            "status": "delivered", "raw_status": "delivered", "error_code": None, "error_message": None,
            "occurred_at": NOW, "received_at": NOW + timedelta(seconds=1),
        },
    }


MINIMAL_VALUES: dict[str, dict[str, Any]] = {
    NOTIFICATION_REQUEST: {
        "notification_id": str(ID), "idempotency_key": "k", "user_id": "u", "type": "otp", "created_at": NOW,
        "source_service": "auth",
    },
    DELIVERY_EVENT: {
        "event_id": str(OTHER_ID), "notification_id": str(ID), "user_id": "u",
        "notification_type": "marketing", "lane": "bulk", "status": "received", "stage": "intake",
        "occurred_at": NOW,
    },
    USER_SETTINGS: {"user_id": "u", "version": 1, "updated_at": NOW},
    DELIVERY_TASK: {
        "notification_id": str(ID), "user_id": "u", "type": "otp", "lane": "critical", "channel": "push",
        "created_at": NOW,
    },
    PROVIDER_RECEIPT: {
        "provider": "twilio", "provider_message_id": "SM123", "status": "failed", "raw_status": "undelivered",
        "received_at": NOW,
    },
}


@pytest.fixture(scope="module")
def single() -> AvroSerde:
    return AvroSerde()


@pytest.fixture(scope="module")
def confluent() -> AvroSerde:
    """The factory's serializer for settings naming the library's in-memory registry."""
    return serde.serde(dataclasses.replace(config.load({}), schema_registry_url="mock://test-serde"))


def registry_of(codec: AvroSerde) -> SchemaRegistryClient:
    assert codec.registry is not None
    return codec.registry


def single_object(schema: dict[str, Any], value: dict[str, Any]) -> bytes:
    """Single-object encoding written here from the spec, independently of pipeline.serde."""
    parsed = fastavro.parse_schema(schema, {})
    body = io.BytesIO()
    fastavro.schemaless_writer(body, parsed, value)
    fingerprint = crc64_avro(to_parsing_canonical_form(parsed).encode())
    return b"\xc3\x01" + fingerprint.to_bytes(8, "little") + body.getvalue()


def crc64_avro(data: bytes) -> int:
    """The Rabin fingerprint of the Avro spec ("Schema Fingerprints"), as printed there."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty if fp & 1 else 0)
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def schema_json(name: str) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads((schemas.SCHEMAS_DIR / f"{name}.avsc").read_text()))


def without_keys(value: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k not in keys}


def without_fields(schema: dict[str, Any], *names: str) -> dict[str, Any]:
    return {**schema, "fields": [f for f in schema["fields"] if f["name"] not in names]}


def copy_schemas(tmp_path: Path) -> Path:
    target = tmp_path / "schemas"
    shutil.copytree(schemas.SCHEMAS_DIR, target)
    return target


# --- round trips --------------------------------------------------------------------------------------------


def test_record_constants_name_the_schema_files(single: AvroSerde) -> None:
    assert set(single.records) == set(RECORDS)
    for name in RECORDS:
        assert single.schema(name).full_name == f"io.notify.v1.{name}"


@pytest.mark.parametrize("name", RECORDS)
def test_single_object_round_trip(single: AvroSerde, name: str) -> None:
    value = full_values()[name]
    data = single.encode(name, value)
    fingerprint = crc64_avro(to_parsing_canonical_form(single.schema(name).parsed).encode())
    assert data[:10] == b"\xc3\x01" + fingerprint.to_bytes(8, "little")
    assert single.decode(data) == (name, value)
    assert single.decode(data, expected=name).value == value


@pytest.mark.parametrize("name", RECORDS)
def test_confluent_round_trip(confluent: AvroSerde, name: str) -> None:
    value = full_values()[name]
    data = confluent.encode(name, value)
    current = Schema(json.dumps(confluent.schema(name).raw), "AVRO")
    registered = registry_of(confluent).lookup_schema(f"io.notify.v1.{name}", current)  # RecordNameStrategy
    assert data[0] == 0
    assert int.from_bytes(data[1:5], "big") == registered.schema_id
    assert confluent.decode(data) == (name, value)


def test_confluent_serde_reads_single_object_data(single: AvroSerde, confluent: AvroSerde) -> None:
    value = full_values()[DELIVERY_EVENT]
    assert confluent.decode(single.encode(DELIVERY_EVENT, value)) == (DELIVERY_EVENT, value)


def test_serde_factory_is_cached_per_settings() -> None:
    plain = config.load({})
    assert serde.serde(plain) is serde.serde(plain)
    assert serde.serde(plain).registry is None


@pytest.mark.parametrize("name", RECORDS)
def test_omitted_optional_fields_get_their_defaults(single: AvroSerde, name: str) -> None:
    decoded = single.decode(single.encode(name, MINIMAL_VALUES[name])).value
    fields = single.schema(name).raw["fields"]
    assert set(decoded) == {f["name"] for f in fields}
    for field in fields:
        if field["name"] not in MINIMAL_VALUES[name]:
            assert decoded[field["name"]] == field["default"], field["name"]


def test_ids_and_times_decode_as_uuid_and_aware_utc(single: AvroSerde) -> None:
    decoded = single.decode(single.encode(NOTIFICATION_REQUEST, MINIMAL_VALUES[NOTIFICATION_REQUEST])).value
    assert decoded["notification_id"] == ID
    assert decoded["created_at"] == NOW
    assert decoded["created_at"].utcoffset() == timedelta(0)


# --- schema evolution ---------------------------------------------------------------------------------------


def test_data_of_an_older_release_reads_with_the_current_schema(tmp_path: Path) -> None:
    schemas_dir = copy_schemas(tmp_path)
    old = without_fields(schema_json(NOTIFICATION_REQUEST), "locale", "correlation_id", "collapse_key")
    history = schemas_dir / "history" / NOTIFICATION_REQUEST
    (history / "1.avsc").rename(history / "2.avsc")
    (history / "1.avsc").write_text(json.dumps(old))
    value = without_keys(full_values()[NOTIFICATION_REQUEST], "locale", "correlation_id", "collapse_key")

    decoded = AvroSerde(schemas_dir).decode(single_object(old, value))

    assert decoded.record == NOTIFICATION_REQUEST
    assert decoded.value == {**value, "locale": "en", "correlation_id": None, "collapse_key": None}


def test_data_of_an_older_registered_schema_reads_with_the_current_schema(confluent: AvroSerde) -> None:
    old = without_fields(schema_json(USER_SETTINGS), "digest", "quiet_hours")
    old_id = registry_of(confluent).register_schema(f"io.notify.v1.{USER_SETTINGS}", Schema(json.dumps(old)))
    value = without_keys(full_values()[USER_SETTINGS], "digest", "quiet_hours")
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(old, {}), value)

    decoded = confluent.decode(b"\x00" + old_id.to_bytes(4, "big") + body.getvalue(), expected=USER_SETTINGS)

    assert decoded.value == {**value, "digest": "none", "quiet_hours": None}


def test_data_of_an_unreleased_schema_is_unknown(single: AvroSerde) -> None:
    newer = schema_json(PROVIDER_RECEIPT)
    newer["fields"].append({"name": "extra", "type": "string", "default": ""})
    value = {**full_values()[PROVIDER_RECEIPT], "extra": "x"}
    with pytest.raises(DecodeError) as raised:
        single.decode(single_object(newer, value))
    assert raised.value.reason == "unknown_fingerprint"


# --- garbage ------------------------------------------------------------------------------------------------


def valid(name: str = NOTIFICATION_REQUEST) -> bytes:
    return AvroSerde().encode(name, full_values()[name])


def with_body_byte(data: bytes, offset: int, byte: int) -> bytes:
    return data[: 10 + offset] + bytes([byte]) + data[10 + offset + 1 :]


GARBAGE = {
    "empty": (b"", "empty"),
    "json": (b'{"notification_id": "x"}', "unknown_magic"),
    "random": (bytes.fromhex("9f11e2d3c4b5a6978800"), "unknown_magic"),
    "other single-object version": (b"\xc3\x02" + valid()[2:], "unknown_magic"),
    "one magic byte": (b"\xc3", "truncated"),
    "short fingerprint": (b"\xc3\x01\x12\x34", "truncated"),
    "unknown fingerprint": (b"\xc3\x01" + bytes(8) + valid()[10:], "unknown_fingerprint"),
    "cut body": (valid()[:-5], "truncated"),
    "header only": (valid()[:10], "truncated"),
    "trailing bytes": (valid() + b"\x00", "malformed_body"),
    # the notification_id string (length byte, then 36 characters) gets a byte that is not UTF-8
    "bad utf-8": (with_body_byte(valid(), 1, 0xFF), "malformed_body"),
    # the first field of ProviderReceipt is an enum of 4 symbols; index 63 does not exist
    "enum index out of range": (with_body_byte(valid(PROVIDER_RECEIPT), 0, 0x7E), "malformed_body"),
    "confluent framing without registry": (b"\x00\x00\x00\x00\x01" + valid()[10:], "no_registry"),
}


@pytest.mark.parametrize(("data", "reason"), GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_raises_decode_error_with_reason(single: AvroSerde, data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as raised:
        single.decode(data)
    assert raised.value.reason == reason
    assert raised.value.detail


def test_confluent_garbage(confluent: AvroSerde) -> None:
    foreign = {"type": "record", "name": "Payment", "namespace": "com.bank",
               "fields": [{"name": "a", "type": "int"}]}
    foreign_id = registry_of(confluent).register_schema("com.bank.Payment", Schema(json.dumps(foreign)))
    cases = [
        (b"\x00\x00\x01", "truncated"),
        (b"\x00" + (999_999).to_bytes(4, "big") + b"\x02", "unknown_schema_id"),
        (b"\x00" + foreign_id.to_bytes(4, "big") + b"\x02", "unknown_record"),
    ]
    for data, reason in cases:
        with pytest.raises(DecodeError) as raised:
            confluent.decode(data)
        assert raised.value.reason == reason, data


def test_expected_record_is_enforced(single: AvroSerde) -> None:
    data = single.encode(DELIVERY_EVENT, full_values()[DELIVERY_EVENT])
    with pytest.raises(DecodeError) as raised:
        single.decode(data, expected=NOTIFICATION_REQUEST)
    assert raised.value.reason == "unexpected_record"
    with pytest.raises(ValueError, match="no schema"):
        single.decode(data, expected="NoSuchRecord")


def test_registry_outage_is_not_a_decode_error() -> None:
    """A registry that cannot be reached says nothing about the bytes: they must not be quarantined."""

    class UnreachableRegistry:
        def get_schema(self, schema_id: int) -> Any:
            raise ConnectionError("connection refused")

    codec = AvroSerde(registry=cast(SchemaRegistryClient, UnreachableRegistry()))
    with pytest.raises(RegistryError):
        codec.decode(b"\x00\x00\x00\x00\x07\x02")


# Every fingerprint we know, so that generated bodies reach fastavro instead of stopping at the header.
HEADERS = [b"\xc3\x01" + AvroSerde().schema(name).fingerprint for name in RECORDS]
SAMPLES = [valid(name) for name in RECORDS]


def decodes_or_decode_error(codec: AvroSerde, data: bytes) -> None:
    with contextlib.suppress(DecodeError):  # anything else propagates and fails the test
        codec.decode(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_decode_error(single: AvroSerde, data: bytes) -> None:
    decodes_or_decode_error(single, data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.sampled_from(HEADERS), body=st.binary(max_size=300))
def test_arbitrary_bodies_decode_or_raise_decode_error(single: AvroSerde, header: bytes, body: bytes) -> None:
    decodes_or_decode_error(single, header + body)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sample=st.sampled_from(SAMPLES),
    edits=st.lists(st.tuples(st.integers(min_value=10), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(min_value=0),
)
def test_corrupted_records_decode_or_raise_decode_error(
    single: AvroSerde, sample: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(sample)
    for position, byte in edits:
        data[position % len(data)] = byte
    decodes_or_decode_error(single, bytes(data[: len(data) - cut % 8]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema_id=st.integers(0, 8), body=st.binary(max_size=200))
def test_arbitrary_confluent_frames_decode_or_raise_decode_error(
    confluent: AvroSerde, schema_id: int, body: bytes
) -> None:
    decodes_or_decode_error(confluent, b"\x00" + schema_id.to_bytes(4, "big") + body)


# --- encoding errors ----------------------------------------------------------------------------------------


def with_changes(name: str, **changes: Any) -> dict[str, Any]:
    return {**full_values()[name], **changes}


BAD_VALUES = {
    "missing required field": (
        without_keys(full_values()[NOTIFICATION_REQUEST], "user_id"), "user_id"),
    "wrong type": (with_changes(NOTIFICATION_REQUEST, user_id=42), "user_id"),
    "unknown enum symbol": (with_changes(NOTIFICATION_REQUEST, type="loan"), "type"),
    "unknown field (a typo)": (with_changes(NOTIFICATION_REQUEST, correlation_Id="x"), "correlation_Id"),
    "not a UUID": (with_changes(NOTIFICATION_REQUEST, notification_id="abc"), "notification_id"),
    "naive datetime": (with_changes(NOTIFICATION_REQUEST, created_at=datetime(2025, 1, 1)), "created_at"),
    "float for int": (with_changes(DELIVERY_EVENT, attempt=1.5), "attempt"),
    "int beyond 32 bits": (with_changes(DELIVERY_EVENT, attempt=2**40), "attempt"),
    "string for array": (with_changes(NOTIFICATION_REQUEST, channels="sms"), "channels"),
}


@pytest.mark.parametrize(("value", "field"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_values_that_do_not_fit_raise_encode_error(
    single: AvroSerde, value: dict[str, Any], field: str
) -> None:
    name = DELIVERY_EVENT if "event_id" in value else NOTIFICATION_REQUEST
    with pytest.raises(EncodeError, match=field):
        single.encode(name, value)


def test_unknown_record_name_raises_encode_error(single: AvroSerde) -> None:
    with pytest.raises(EncodeError, match="NoSuchRecord"):
        single.encode("NoSuchRecord", {})


# --- freeze and check_history -------------------------------------------------------------------------------


def add_field(schemas_dir: Path, name: str, field: dict[str, Any]) -> None:
    path = schemas_dir / f"{name}.avsc"
    schema = json.loads(path.read_text())
    schema["fields"].append(field)
    path.write_text(json.dumps(schema, indent=2))


def test_repository_history_is_clean() -> None:
    assert schemas.check_history() == []


def test_freeze_releases_a_compatible_change_once(tmp_path: Path) -> None:
    schemas_dir = copy_schemas(tmp_path)
    add_field(schemas_dir, DELIVERY_EVENT, {"name": "region", "type": ["null", "string"], "default": None})
    assert any("run `notify schemas freeze`" in p for p in schemas.check_history(schemas_dir))

    next_release = len(list((schemas_dir / "history" / DELIVERY_EVENT).glob("*.avsc"))) + 1
    written = schemas.freeze(schemas_dir)

    release = schemas_dir / "history" / DELIVERY_EVENT / f"{next_release}.avsc"
    assert written == [release]
    assert release.read_bytes() == (schemas_dir / f"{DELIVERY_EVENT}.avsc").read_bytes()
    assert schemas.check_history(schemas_dir) == []
    assert schemas.freeze(schemas_dir) == []


def test_freeze_starts_the_history(tmp_path: Path) -> None:
    schemas_dir = copy_schemas(tmp_path)
    shutil.rmtree(schemas_dir / "history")
    written = schemas.freeze(schemas_dir)
    assert sorted(p.relative_to(schemas_dir).as_posix() for p in written) == sorted(
        f"history/{name}/1.avsc" for name in RECORDS
    )


def test_freeze_refuses_an_incompatible_change(tmp_path: Path) -> None:
    schemas_dir = copy_schemas(tmp_path)
    # No default: data of the released version, which lacks the field, could not be read.
    add_field(schemas_dir, DELIVERY_EVENT, {"name": "region", "type": "string"})
    released_before = sorted((schemas_dir / "history" / DELIVERY_EVENT).glob("*.avsc"))
    with pytest.raises(SchemaError, match="cannot read data written with"):
        schemas.freeze(schemas_dir)
    assert sorted((schemas_dir / "history" / DELIVERY_EVENT).glob("*.avsc")) == released_before
    assert any("cannot read data written with" in p for p in schemas.check_history(schemas_dir))


def test_check_history_finds_broken_files(tmp_path: Path) -> None:
    schemas_dir = copy_schemas(tmp_path)
    history = schemas_dir / "history"
    (history / USER_SETTINGS / "1.avsc").rename(history / USER_SETTINGS / "2.avsc")
    add_field(schemas_dir, DELIVERY_TASK, {"name": "note", "type": ["null", "string"], "default": "x"})
    settings_schema = json.loads((schemas_dir / f"{USER_SETTINGS}.avsc").read_text())
    settings_schema["fields"][2]["type"]["items"]["symbols"].append("whatsapp")  # Channel, in this file only
    (schemas_dir / f"{USER_SETTINGS}.avsc").write_text(json.dumps(settings_schema))
    (schemas_dir / "Broken.avsc").write_text("{not json")

    problems = "\n".join(schemas.check_history(schemas_dir))

    assert "numbered 1..n without gaps" in problems
    assert "DeliveryTask.note: the default must match the union's first type" in problems
    assert "io.notify.v1.Channel differs between" in problems
    assert "Broken.avsc: not a valid Avro schema" in problems
    with pytest.raises(SchemaError):
        AvroSerde(schemas_dir)
