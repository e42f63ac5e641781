"""Console sessions and CSRF tokens: pure functions of a secret, a clock and what the browser sent.

A session cookie reads `<payload>.<mac>`: the payload (URL-safe base64 of JSON) names the admin key it was opened
with (its public id, or none before login), a random nonce and when it expires; the MAC is HMAC-SHA256 over the
payload with the console's secret, so a cookie cannot be forged or altered. The key itself is never in the cookie:
each request looks the key id up again (cached for seconds), so a revoked key, or one that lost `admin`, ends its
sessions within the key cache time.

Every form carries a CSRF token derived from the session's nonce (HMAC with the same secret, another purpose):
a page of another site cannot read it, so a forged post is refused (403), and logging in replaces the nonce.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Final

SESSION_TTL_S: Final = 8 * 3600
MAX_COOKIE_LENGTH: Final = 512
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


@dataclass(frozen=True)
class Session:
    nonce: str
    key_id: str | None  # None: not logged in yet (the login form still needs a CSRF token)
    expires_at: float


def new_session(key_id: str | None, now: float, ttl_s: float = SESSION_TTL_S) -> Session:
    return Session(secrets.token_urlsafe(24), key_id, now + ttl_s)


def _mac(secret: bytes, purpose: str, text: str) -> str:
    return hmac.new(secret, f"{purpose}|{text}".encode(), hashlib.sha256).hexdigest()


def encode(secret: bytes, session: Session) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(
        {"n": session.nonce, "k": session.key_id, "e": int(session.expires_at)}, separators=(",", ":")).encode()
    ).decode().rstrip("=")
    return f"{payload}.{_mac(secret, 'session', payload)}"


def decode(secret: bytes, cookie: str | None, now: float) -> Session | None:
    """The session a cookie holds; None when absent, malformed, forged, altered or expired."""
    if not cookie or len(cookie) > MAX_COOKIE_LENGTH or cookie.count(".") != 1:
        return None
    payload, mac = cookie.split(".")
    if not hmac.compare_digest(mac, _mac(secret, "session", payload)):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        nonce, key_id, expires_at = data["n"], data["k"], float(data["e"])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(nonce, str) or not _NONCE.match(nonce) or expires_at <= now:
        return None
    if key_id is not None and (not isinstance(key_id, str) or not _KEY_ID.match(key_id)):
        return None
    return Session(nonce, key_id, expires_at)


def csrf_token(secret: bytes, nonce: str) -> str:
    """The token every form of this session carries."""
    return _mac(secret, "csrf", nonce)


def csrf_ok(secret: bytes, nonce: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(str(presented), csrf_token(secret, nonce))
