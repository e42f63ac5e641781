"""Rendering a task's content: pre-rendered `content` as is, or a template from the catalogue with its params.

Pure: the sender calls `render` before it claims anything it could not send. A template that does not exist or
lacks a parameter is a permanent failure with a clear code (retrying cannot fix it), never a crash.
Templates are per locale with an English fallback; `{name}` placeholders take `template_params`.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final


@dataclass(frozen=True)
class Rendered:
    subject: str | None
    body: str


class TemplateError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# template id -> locale -> (subject, body). `<type>.default` exists for every notification type.
CATALOGUE: Final[Mapping[str, Mapping[str, tuple[str | None, str]]]] = {
    "otp.login": {
        "en": ("Your login code", "Your login code is {code}. It expires in 5 minutes. Never share it."),
        "fr": ("Votre code de connexion", "Votre code de connexion est {code}. Il expire dans 5 minutes."),
    },
    "otp.default": {"en": ("Your verification code", "Your verification code is {code}. Never share it.")},
    "transaction.debit": {"en": ("Debit alert", "Debit of {amount} {currency} on account {account} at {merchant}.")},
    "transaction.default": {"en": ("Transaction alert", "A transaction was made on your account.")},
    "security.default": {"en": ("Security notice", "A new sign-in to your account. Not you? Contact us now.")},
    "price_alert.default": {"en": ("Price alert", "An asset on your watch list crossed your alert price.")},
    "portfolio.default": {"en": ("Portfolio update", "Your portfolio summary is ready.")},
    "marketing.default": {"en": ("News from us", "Something new is waiting for you in the app.")},
}


# Twilio refuses a longer body (error 21617), and a concatenated SMS of more parts than that is not delivered whole.
MAX_SMS_CHARS: Final = 1600


def sms_length(body: str) -> int:
    """Length as SMS providers count it: UTF-16 code units (an emoji is two)."""
    return len(body.encode("utf-16-le")) // 2


def _placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def _texts(template_id: str | None, locale: str | None, params: Mapping[str, Any]) -> tuple[str | None, str]:
    """The (subject, body) to format for this template and locale; raises TemplateError."""
    locales = CATALOGUE.get(template_id or "")
    if locales is None:
        raise TemplateError("unknown_template", f"no template {template_id!r}; known: {', '.join(sorted(CATALOGUE))}")
    locale = str(locale or "en")
    subject, body = locales.get(locale) or locales.get(locale.split("-")[0]) or locales["en"]
    missing = sorted((_placeholders(body) | _placeholders(subject or "")) - set(params))
    if missing:
        raise TemplateError("missing_template_param", f"template {template_id!r} needs {', '.join(missing)}")
    return subject, body


def one_line(subject: str | None) -> str | None:
    """An email subject is one header line: a CR or LF in it (a caller's, or a template parameter's) would be a
    header injection at a provider that builds MIME itself, so line breaks fold into single spaces."""
    if subject is None or not any(c in subject for c in "\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029"):
        return subject
    return " ".join(part for part in subject.splitlines() if part.strip()) or " "


def render(task: Mapping[str, Any]) -> Rendered:
    """The subject and body to send for a DeliveryTask; raises TemplateError."""
    content = task.get("content")
    if content is not None:
        return Rendered(one_line(content.get("subject")), content["body"])
    params: Mapping[str, str] = task.get("template_params") or {}
    subject, body = _texts(task.get("template_id"), task.get("locale"), params)
    return Rendered(one_line(subject.format_map(params)) if subject else None, body.format_map(params))
