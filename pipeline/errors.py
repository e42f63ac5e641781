"""One root error for the project; stages and the CLI branch on the type, never on message text."""

from __future__ import annotations


class NotifyError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(NotifyError):
    """A setting is unknown or malformed; raised at start-up."""


class StackError(NotifyError):
    """A local stack service could not be installed, started or reached."""


class DecodeError(NotifyError):
    """Bytes that are not one of our Avro records, or a record that does not fit its schema.

    `reason` is a short machine-friendly reason (it travels in the quarantine topic's headers); the message
    says the same for people.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class MigrationError(NotifyError):
    """A migration failed, or an applied migration was edited after it ran."""


class TopicSpecError(NotifyError):
    """topics/ declares something inconsistent (e.g. co-partitioned topics with different partition counts)."""
