"""Connectors by provider name, configured from Settings."""

from __future__ import annotations

from typing import Any

from connectors.apns_push import ApnsPush
from connectors.base import Connector
from connectors.fcm_push import FcmPush
from connectors.mailgun_email import MailgunEmail
from connectors.sendgrid_email import SendGridEmail
from connectors.termii_sms import TermiiSms
from connectors.twilio_sms import TwilioSms
from pipeline.config import Settings

CONNECTORS: dict[str, type[TwilioSms | TermiiSms | SendGridEmail | MailgunEmail | FcmPush | ApnsPush]] = {
    "twilio": TwilioSms, "termii": TermiiSms, "sendgrid": SendGridEmail, "mailgun": MailgunEmail, "fcm": FcmPush,
    "apns": ApnsPush,
}


def create_connector(provider: str, settings: Settings, **overrides: Any) -> Connector:
    """The connector of `provider` (twilio, termii, sendgrid, mailgun, fcm, apns); `overrides` replace constructor
    arguments."""
    try:
        cls = CONNECTORS[provider]
    except KeyError:
        raise ValueError(f"unknown provider {provider!r}; known: {sorted(CONNECTORS)}") from None
    return cls.from_settings(settings, **overrides)
