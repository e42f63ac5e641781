"""Rendering a task's content: pre-rendered `content` as is, or a template of `templates/` with its params.

`templates/<template_id>/<locale>/` holds one file per part (`FILES`); the channel picks the part, and a part a
locale lacks falls back within that locale (`_SUBJECT`, `_BODY`): SMS and push bodies to `email_text.txt`, the
push title to `email_subject.txt`; no `email_html.html` means a text-only email. The locale is the task's own
folder (`en-NG`), else its language's (`en`), else `en`. Files are Jinja2 templates rendered in a sandbox with
strict undefined variables; HTML is autoescaped, text is not. The directory (NOTIFY_TEMPLATES_DIR) is read and
checked once per process (`catalogue`); processes call `validate` at start-up, `notify templates check` lists
every problem.

Pure apart from that one read: the sender calls `render` before it claims anything it could not send. A template
that does not exist, lacks a parameter, is invalid (it does not compile, breaks the sandbox) is a permanent failure
with a clear code (retrying cannot fix it), never a crash; `validate` makes an invalid directory a ConfigError.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final

import jinja2
from jinja2 import meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from pipeline import config
from pipeline.domain import NOTIFICATION_TYPES
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Rendered:
    subject: str | None  # email subject; push title (SMS: the email subject, unused)
    body: str  # the channel's text
    html: str | None = None  # email only, when the template has email_html.html


class TemplateError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# The parts a locale folder may hold; email_text.txt is required (every other body falls back to it).
FILES: Final = ("email_subject.txt", "email_text.txt", "email_html.html", "sms.txt", "push_title.txt",
                "push_body.txt")
REQUIRED_FILE: Final = "email_text.txt"
FALLBACK_LOCALE: Final = "en"
# channel -> the files its subject and body come from, first present wins (None: no channel, email's parts)
_SUBJECT: Final[Mapping[str | None, tuple[str, ...]]] = {"push": ("push_title.txt", "email_subject.txt")}
_BODY: Final[Mapping[str | None, tuple[str, ...]]] = {"sms": ("sms.txt", "email_text.txt"),
                                                      "push": ("push_body.txt", "email_text.txt")}
_ID: Final = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)+")
_LOCALE: Final = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")

# Params are strings: HTML escapes them, text keeps them as given. Without a loader, include/extends fail.
_TEXT_ENV: Final = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
_HTML_ENV: Final = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=True)


@dataclass(frozen=True)
class _Part:
    name: str  # "<template_id>/<locale>/<file>", for messages
    template: jinja2.Template
    variables: frozenset[str]  # what it refers to without defining


@dataclass(frozen=True)
class Catalogue:
    directory: Path
    templates: Mapping[str, Mapping[str, Mapping[str, _Part]]]  # template id -> locale (lower case) -> file -> part
    problems: tuple[str, ...]  # each names the file; empty: valid
    broken: Mapping[str, tuple[str, ...]]  # template id -> its own problems: it does not render at all

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.templates))


def _compile(name: str, path: Path, problems: list[str]) -> _Part | None:
    env = _HTML_ENV if path.suffix == ".html" else _TEXT_ENV
    try:
        source = path.read_text(encoding="utf-8")
        template = env.from_string(source)
        variables = frozenset(meta.find_undeclared_variables(env.parse(source)))
    except UnicodeDecodeError as exc:
        problems.append(f"{name}: not UTF-8 ({exc.reason} at byte {exc.start})")
        return None
    except jinja2.TemplateSyntaxError as exc:
        problems.append(f"{name}:{exc.lineno}: {exc.message}")
        return None
    if not source.strip():
        problems.append(f"{name}: empty")
        return None
    try:  # params are strings: with one for every variable, what fails here fails for every notification
        template.render(dict.fromkeys(variables, "x"))
    except SecurityError as exc:
        problems.append(f"{name}: not allowed in the sandbox: {exc}")
        return None
    except Exception as exc:
        problems.append(f"{name}: fails to render: {exc}")
        return None
    return _Part(name, template, variables)


def load(directory: Path) -> Catalogue:
    """Read and check every template under `directory` (uncached; see `catalogue`)."""
    problems: list[str] = []
    found: dict[str, dict[str, dict[str, _Part]]] = {}
    broken: dict[str, tuple[str, ...]] = {}
    if not directory.is_dir():
        return Catalogue(directory, {}, (f"{directory}: not a directory (NOTIFY_TEMPLATES_DIR)",), {})
    for folder in sorted(directory.iterdir()):
        if folder.name.startswith("."):
            continue
        if not folder.is_dir() or not _ID.fullmatch(folder.name):
            problems.append(f"{folder.name}: not a template folder (<type>.<name>, lower case, e.g. otp.login)")
            continue
        before = len(problems)
        locales: dict[str, dict[str, _Part]] = {}
        for locale in sorted(folder.iterdir()):
            where = f"{folder.name}/{locale.name}"
            if not locale.is_dir() or not _LOCALE.fullmatch(locale.name):
                problems.append(f"{where}: not a locale folder (such as en, fr or en-NG)")
                continue
            parts: dict[str, _Part] = {}
            for file in sorted(locale.iterdir()):
                if file.name not in FILES:
                    problems.append(f"{where}/{file.name}: unknown file; known: {', '.join(FILES)}")
                elif (part := _compile(f"{where}/{file.name}", file, problems)) is not None:
                    parts[file.name] = part
            if not (locale / REQUIRED_FILE).is_file():
                problems.append(f"{where}/{REQUIRED_FILE}: missing (every other body falls back to it)")
            locales[locale.name.lower()] = parts
        if FALLBACK_LOCALE not in locales:
            problems.append(f"{folder.name}/{FALLBACK_LOCALE}: missing (the locale every other falls back to)")
        found[folder.name] = locales
        if len(problems) > before:  # a broken part must not fall back silently to another
            broken[folder.name] = tuple(problems[before:])
    problems += [f"{kind}.default: missing (every notification type has a default template)"
                 for kind in NOTIFICATION_TYPES if f"{kind}.default" not in found]
    return Catalogue(directory, found, tuple(problems), broken)


@cache
def _cached(directory: str) -> Catalogue:
    return load(Path(directory))


def catalogue(directory: Path | None = None) -> Catalogue:
    """The templates of `directory` (default: NOTIFY_TEMPLATES_DIR), read once per process."""
    if directory is None:
        setting = config.SETTINGS["templates_dir"]
        return _cached(os.environ.get(setting.env) or str(setting.default))
    return _cached(str(directory))


def validate(directory: Path | None = None) -> Catalogue:
    """The catalogue, or a ConfigError listing each problem: what processes call at start-up."""
    found = catalogue(directory)
    if found.problems:
        raise ConfigError(f"templates in {found.directory} are invalid:\n  " + "\n  ".join(found.problems))
    return found


def template_ids() -> tuple[str, ...]:
    return catalogue().ids


# Twilio refuses a longer body (error 21617), and a concatenated SMS of more parts than that is not delivered whole.
MAX_SMS_CHARS: Final = 1600

def resolve_locale(template_id: str | None, locale: str | None) -> str:
    """The locale folder a template renders from: `locale` (en-NG), else its language (en), else en."""
    found = catalogue()
    locales = found.templates.get(template_id or "")
    if locales is None:
        raise TemplateError("unknown_template", f"no template {template_id!r}; known: {', '.join(found.ids)}")
    if (problems := found.broken.get(str(template_id))) is not None:
        raise TemplateError("invalid_template", f"template {template_id!r} is invalid: {'; '.join(problems)}")
    wanted = str(locale or FALLBACK_LOCALE).lower().replace("_", "-")
    return next((key for key in (wanted, wanted.split("-")[0]) if key in locales), FALLBACK_LOCALE)


def _locale_parts(template_id: str | None, locale: str | None) -> Mapping[str, _Part]:
    folder = resolve_locale(template_id, locale)  # raises for an unknown or broken template
    return catalogue().templates[str(template_id)][folder]


def _pick(parts: Mapping[str, _Part], names: tuple[str, ...]) -> _Part | None:
    return next((parts[name] for name in names if name in parts), None)


def _render(template_id: str | None, chosen: list[_Part | None], params: Mapping[str, Any]) -> list[str | None]:
    try:
        return [None if part is None else part.template.render(params) for part in chosen]
    except SecurityError as exc:
        raise TemplateError("template_not_allowed", f"template {template_id!r}: {exc}") from None
    except jinja2.UndefinedError as exc:
        missing = sorted(set().union(*(p.variables for p in chosen if p is not None)) - set(params))
        raise TemplateError("missing_template_param",
                            f"template {template_id!r} needs {', '.join(missing) if missing else exc}") from None
    except Exception as exc:  # a template error: no retry can fix it
        raise TemplateError("template_failed", f"template {template_id!r} failed to render: {exc}") from None


def one_line(subject: str | None) -> str | None:
    """An email subject is one header line: a CR or LF in it (a caller's, or a template parameter's) would be a
    header injection at a provider that builds MIME itself, so line breaks fold into single spaces."""
    if subject is None or not any(c in subject for c in "\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029"):
        return subject
    return " ".join(part for part in subject.splitlines() if part.strip()) or " "


def render(task: Mapping[str, Any]) -> Rendered:
    """The subject, body (and email HTML) to send for a DeliveryTask on its channel; raises TemplateError."""
    content = task.get("content")
    if content is not None:
        return Rendered(one_line(content.get("subject")), content["body"])
    params: Mapping[str, str] = task.get("template_params") or {}
    channel, template_id = task.get("channel"), task.get("template_id")
    parts = _locale_parts(template_id, task.get("locale"))
    html = parts.get("email_html.html") if channel in ("email", None) else None
    chosen = [_pick(parts, _SUBJECT.get(channel, ("email_subject.txt",))),
              _pick(parts, _BODY.get(channel, (REQUIRED_FILE,))), html]
    subject, body, html_text = _render(template_id, chosen, params)
    return Rendered(one_line(subject), body or "", html_text)
