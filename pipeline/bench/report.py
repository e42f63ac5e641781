"""The figures of a `notify bench` run: printed as text, and written to a folder as Markdown with PNG charts
(throughput over time, latency CDF per lane, CPU per process) and the raw figures as JSON."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.bench import load
from pipeline.bench.rig import Spread

if TYPE_CHECKING:
    from pipeline.bench.results import PhaseResult

HEADER = f"| {'latency (ms)':34} | {'n':>7} | {'p50':>7} | {'p95':>7} | {'p99':>7} | {'max':>7} |"
RULE = f"|{'-' * 36}|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|"


def _row(label: str, spread: Spread | None) -> str:
    if spread is None:
        return f"| {label:34} | {'-':>7} | {'':>7} | {'':>7} | {'':>7} | {'':>7} |"
    return (f"| {label:34} | {spread.n:>7} | {spread.p50:>7.0f} | {spread.p95:>7.0f} | {spread.p99:>7.0f} | "
            f"{spread.max:>7.0f} |")


def _phase_of(result: PhaseResult) -> str:
    return {"idle": "i", "burst": "t", "backlog": "k", "baseline": "t"}[result.name]


def latency_table(result: PhaseResult) -> list[str]:
    phase = _phase_of(result)
    lines = [HEADER, RULE]
    for lane in load.indices_by_lane(phase, result.requests):
        for name, spread in result.latency(phase, lane).items():
            lines.append(_row(f"{lane} {name}", spread))
    return lines


def cpu_table(results: Sequence[PhaseResult]) -> list[str]:
    from pipeline.bench.results import cpu_ms_per_notification

    per = [cpu_ms_per_notification(r) for r in results]
    roles = sorted({role for p in per for role in p}, key=lambda r: -max(p.get(r, 0.0) for p in per))
    lines = ["| process | " + " | ".join(f"{r.name} CPU ms / notification" for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    for role in roles:
        lines.append(f"| {role} | " + " | ".join(f"{p.get(role, 0.0):.3f}" for p in per) + " |")
    totals = [sum(p.values()) for p in per]
    lines.append("| **every process** | " + " | ".join(f"**{t:.3f}**" for t in totals) + " |")
    busy = [1000 * r.usage.busy_s / r.accepted if r.usage and r.accepted else math.nan for r in results]
    lines.append("| the machine (/proc/stat, all cores) | " + " | ".join(f"{b:.3f}" for b in busy) + " |")
    return lines


def memory_table(result: PhaseResult) -> list[str]:
    if result.usage is None:
        return []
    roles = sorted(set(result.usage.rss_before_kib) | set(result.usage.rss_after_kib) | set(result.peak_rss_kib))
    lines = ["| process | RSS before (MiB) | RSS after (MiB) | peak sampled (MiB) |", "|---|---:|---:|---:|"]
    for role in roles:
        before, after = result.usage.rss_before_kib.get(role, 0), result.usage.rss_after_kib.get(role, 0)
        if max(before, after) < 1024:
            continue
        lines.append(f"| {role} | {before / 1024:.0f} | {after / 1024:.0f} | "
                     f"{result.peak_rss_kib.get(role, 0) / 1024:.0f} |")
    return lines


def _throughput_line(result: PhaseResult) -> str:
    wall, rate = result.wall_s, result.throughput
    if wall is None or rate is None:
        return f"{result.name}: nothing reached the provider"
    return (f"{result.name}: {result.accepted}/{result.requests} accepted by the provider in {wall:.1f} s from the "
            f"first request: **{rate:,.0f} notifications/s** end to end (requests produced in {result.produce_s:.1f} "
            f"s)")


def render(results: Mapping[str, Any]) -> str:
    phases: list[PhaseResult] = results["phases"]
    base: PhaseResult | None = results.get("baseline")
    by_name = {p.name: p for p in phases}
    burst = by_name.get("burst")
    out = [f"# notify bench {results['token']}", "",
           f"{os.cpu_count()} cores; Kafka, PostgreSQL, Redis, the simulator, the API, the workers and the bench on "
           f"one machine. Plan: {json.dumps(results['plan'])}", ""]
    out += ["## Summary", ""]
    if burst is not None:
        out.append(f"- {_throughput_line(burst)}")
        if burst.usage and burst.accepted:
            total = sum(burst.usage.grouped().values())
            out.append(f"- CPU per notification, every process on the box: **{1000 * total / burst.accepted:.2f} ms** "
                       f"({total:.1f} CPU-s over {burst.usage.wall_s:.1f} s, {total / burst.usage.wall_s:.2f} cores)")
    if base is not None:
        out.append(f"- baseline {_throughput_line(base)}")
        if burst is not None and burst.throughput and base.throughput:
            out.append(f"- **ratio pipeline / baseline: {burst.throughput / base.throughput:.2f}**")
    ledger = results.get("ledger") or {}
    out.append(f"- provider ledger: {ledger.get('count')} messages for {ledger.get('distinct')} notifications, "
               f"{ledger.get('repeated_count')} notifications sent more than once")
    for p in phases:
        if p.states:
            out.append(f"- {p.name} deliveries by state: {json.dumps(p.states)}")
    idle = by_name.get("idle")
    if idle is not None:
        out += ["", "## Phase 0: an OTP on an idle pipeline", "",
                f"{idle.requests} OTPs through `POST /v1/notifications`, one every 100 ms.", "", HEADER, RULE,
                _row("API 202 -> provider's request", Spread.of(idle.extra.get("from_202_ms", [])))]
        out += [line for line in latency_table(idle)[2:]]
    if burst is not None:
        out += ["", f"## Phase 1: a burst of {burst.requests}", "",
                f"Half critical transaction alerts by SMS (Twilio), half bulk portfolio updates by email (SendGrid); "
                f"{burst.extra.get('via_api', 0)} through the API's batch endpoint. Each stage's span ends when it "
                "produced its output (the record's CreateTime); the sender's when the provider's acceptance was "
                "recorded; the receipt's when the delivered receipt was applied (it includes the simulated delivery "
                "delay).", ""]
        out += latency_table(burst)
        if burst.extra.get("batch_sizes"):
            out += ["", "Mean records per consumed batch: " + ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(burst.extra["batch_sizes"].items()))]
    backlog = by_name.get("backlog")
    if backlog is not None:
        otps: load.Timeline = backlog.extra["otp_timeline"]
        stamps = [v for v in backlog.timeline.points["provider"] if not math.isnan(v)]
        last_otp = max((v for v in otps.points["provider"] if not math.isnan(v)), default=math.nan)
        behind = sum(1 for v in stamps if v > last_otp) + (backlog.requests - len(stamps))
        out += ["", f"## Phase 2: OTPs while a bulk backlog of {backlog.requests} drains", "",
                f"- {_throughput_line(backlog)}",
                f"- when the last OTP reached its provider, {behind} of the backlog "
                f"({100 * behind / max(1, backlog.requests):.0f}%) had not", "", HEADER, RULE,
                _row("OTP created -> provider accepted", Spread.of(otps.spans("created", "provider"))),
                _row("backlog created -> provider accepted", Spread.of(backlog.timeline.spans("created", "provider")))]
    if base is not None:
        out += ["", "## Baseline: the raw chain, the same burst", "", *latency_table(base)]
    measured = [p for p in (burst, base, backlog) if p is not None and p.usage is not None]
    if measured:
        out += ["", "## CPU per notification, per process", "",
                "utime + stime from /proc over each phase (from the first request to the last receipt applied), "
                "divided by the notifications the provider accepted.", "", *cpu_table(measured)]
    with_pg = [p for p in (burst, base) if p is not None and p.extra.get("postgres") and p.accepted]
    if with_pg:
        out += ["", "## PostgreSQL work per notification", "",
                "From pg_stat_database of the run's database over each burst.", "",
                "| counter | " + " | ".join(p.name for p in with_pg) + " |", "|---|" + "---:|" * len(with_pg)]
        for name in with_pg[0].extra["postgres"]:
            out.append(f"| {name} | " + " | ".join(f"{p.extra['postgres'][name] / p.accepted:.2f}"
                                                   for p in with_pg) + " |")
    for phase in (p for p in with_pg if p.extra.get("postgres_tables")):
        out += ["", f"## PostgreSQL reads per table, per notification ({phase.name})", "",
                "From pg_stat_user_tables: a table read whole by a plan shows many rows read by seq scans.", "",
                "| table | seq scans | rows read by seq scans | index scans | rows fetched by index |",
                "|---|---:|---:|---:|---:|"]
        for table, reads in phase.extra["postgres_tables"].items():
            out.append(f"| {table} | " + " | ".join(f"{value / phase.accepted:.2f}" for value in reads.values())
                       + " |")
    if burst is not None and burst.usage is not None and burst.accepted:
        out += ["", "## Capacity model", "",
                "The burst's CPU per notification per stage and of the broker, and PostgreSQL rows written per "
                "notification, as `pipeline/bench/capacity.py` takes them; then what it plans for each rate.", "",
                *capacity_lines(burst)]
    if burst is not None:
        out += ["", "## Memory", "", *memory_table(burst)]
    return "\n".join(out)


def capacity_lines(burst: PhaseResult) -> list[str]:
    """The capacity model's inputs from the burst, and its output (pipeline/bench/capacity.py)."""
    from pipeline.bench import capacity
    from pipeline.bench.results import cpu_ms_per_notification

    postgres = {name: value / burst.accepted for name, value in (burst.extra.get("postgres") or {}).items()}
    return capacity.render(capacity.Measured.from_bench(cpu_ms_per_notification(burst), postgres))


def write(folder: Path, results: Mapping[str, Any], text: str) -> Path:
    """The report folder: report.md, charts, results.json; the path of report.md."""
    folder.mkdir(parents=True, exist_ok=True)
    charts = _charts(folder, results)
    (folder / "report.md").write_text(text + "\n\n## Charts\n\n" + "\n".join(f"![{c.stem}]({c.name})" for c in charts)
                                      + "\n")
    (folder / "results.json").write_text(json.dumps(_raw(results), indent=2, default=str))
    return folder / "report.md"


def _raw(results: Mapping[str, Any]) -> dict[str, Any]:
    from pipeline.bench.results import cpu_ms_per_notification

    def phase(p: PhaseResult) -> dict[str, Any]:
        lat = {f"{lane} {name}": (s.__dict__ if s else None)
               for lane in load.indices_by_lane(_phase_of(p), p.requests)
               for name, s in p.latency(_phase_of(p), lane).items()}
        return {"requests": p.requests, "accepted": p.accepted, "wall_s": p.wall_s, "throughput": p.throughput,
                "produce_s": p.produce_s, "states": p.states, "cpu_ms_per_notification": cpu_ms_per_notification(p),
                "latency_ms": lat, "complete": p.complete}

    out: dict[str, Any] = {"token": results["token"], "plan": results["plan"], "ledger": results.get("ledger"),
                           "phases": {p.name: phase(p) for p in results["phases"]}}
    if results.get("baseline") is not None:
        out["baseline"] = phase(results["baseline"])
    return out


def _charts(folder: Path, results: Mapping[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.bench.results import cpu_ms_per_notification

    phases: list[PhaseResult] = list(results["phases"])
    base = results.get("baseline")
    runs = [p for p in phases if p.name in ("burst", "backlog")] + ([base] if base is not None else [])
    made = []

    fig, ax = plt.subplots(figsize=(9, 4))
    for p in runs:
        counts = load.per_second(p.timeline.points["provider"], p.started_ms)
        ax.plot(range(len(counts)), counts, label=f"{p.name}: provider accepted")
        delivered = load.per_second(p.timeline.points["delivered"], p.started_ms)
        ax.plot(range(len(delivered)), delivered, linestyle=":", label=f"{p.name}: delivered (receipt applied)")
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("notifications per second")
    ax.set_title("Throughput over time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    made.append(folder / "throughput.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    for p in [q for q in phases if q.name in ("idle", "burst")] + ([base] if base is not None else []):
        phase = _phase_of(p)
        for lane, indices in load.indices_by_lane(phase, p.requests).items():
            values = sorted(p.timeline.spans("created", "provider", indices))
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=f"{p.name} {lane}")
    backlog = next((q for q in phases if q.name == "backlog"), None)
    if backlog is not None:
        values = sorted(backlog.extra["otp_timeline"].spans("created", "provider"))
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label="OTPs behind the backlog")
    ax.set_xscale("log")
    ax.set_xlabel("created -> provider accepted (ms, log scale)")
    ax.set_ylabel("share of notifications")
    ax.set_title("End-to-end latency CDF per lane")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    made.append(folder / "latency_cdf.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    measured = [p for p in runs if p.usage is not None and p.accepted]
    if measured:
        per: dict[str, dict[str, float]] = {p.name: cpu_ms_per_notification(p) for p in measured}
        roles = sorted({r for v in per.values() for r in v}, key=lambda r: -max(v.get(r, 0.0) for v in per.values()))
        fig, ax = plt.subplots(figsize=(9, 0.4 * len(roles) + 1.5))
        height = 0.8 / len(per)
        for n, (name, by_role) in enumerate(per.items()):
            ax.barh([i + n * height for i in range(len(roles))], [by_role.get(r, 0.0) for r in roles], height,
                    label=name)
        ax.set_yticks([i + height * (len(per) - 1) / 2 for i in range(len(roles))], roles, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("CPU ms per notification")
        ax.set_title("CPU per process role")
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(folder / "cpu.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made
