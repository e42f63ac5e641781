"""A client of the simulator's admin API, for `notify simulator set | show | reset` and for the sender's rig.

    notify simulator set twilio latency_ms=200 jitter_ms=50 'error_rates={"5xx": 0.1}'
    notify simulator set twilio outage_s=60          # Twilio answers 503 for a minute
    notify simulator set twilio accept_then_hang=1    # accepts, records, never answers
    notify simulator show ledger --provider twilio
    notify simulator reset

Values are JSON where they parse as JSON (numbers, true/false/null, objects), strings otherwise.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any


def admin_call(port: int, method: str, path: str, body: Any = None, *, host: str = "127.0.0.1",
               timeout_s: float = 30.0) -> Any:
    """One admin request; the JSON answer. Raises OSError (urllib's errors are OSErrors) when it fails."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def parse_assignments(pairs: Sequence[str]) -> dict[str, Any]:
    """["latency_ms=50", 'error_rates={"5xx": 0.1}'] -> {"latency_ms": 50, "error_rates": {"5xx": 0.1}}."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r}: expected key=value")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def run_admin_cli(port: int, action: str, args: Sequence[str], provider: str | None = None) -> int:
    """`notify simulator set PROVIDER k=v ... | show ledger|providers|stats|test-sends | reset`."""
    try:
        if action == "set":
            if not args:
                print("notify simulator set: name a provider, then key=value settings")
                return 2
            answer = admin_call(port, "POST", f"/_admin/providers/{args[0]}", parse_assignments(args[1:]))
        elif action == "show":
            what = args[0] if args else "providers"
            if what not in ("ledger", "providers", "stats", "test-sends"):
                print(f"notify simulator show: ledger, providers, stats or test-sends, not {what!r}")
                return 2
            query = f"?provider={provider}" if provider and what in ("ledger", "test-sends") else ""
            answer = admin_call(port, "GET", f"/_admin/{what}{query}")
        else:
            answer = admin_call(port, "POST", "/_admin/reset", {})
    except urllib.error.HTTPError as exc:
        print(f"simulator answered {exc.code}: {exc.read().decode(errors='replace')}")
        return 1
    except (OSError, ValueError) as exc:
        print(f"simulator on port {port}: {exc}")
        return 1
    print(json.dumps(answer, indent=2))
    return 0
