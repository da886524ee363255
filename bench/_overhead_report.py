"""Tables, ratios and target verdicts for bench.proxy_overhead (pure: data in, text out)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["GAP_MS", "STREAM_CHUNKS", "CaseResult", "ChunkResult", "ProbeResult", "Report", "render", "verdicts"]

GAP_MS = 20
STREAM_CHUNKS = 8


@dataclass
class CaseResult:
    round: int
    mix: str
    concurrency: int
    target: str
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float | None
    upstream_cpu_ms_per_request: float
    proxy_core_busy: float | None
    driver_core_busy: float
    load_generator: str


@dataclass
class ProbeResult:
    round: int
    mix: str
    target: str
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    latency_p50_ms: float


@dataclass
class ChunkResult:
    target: str
    requests: int
    # Gaps between successive body reads after the first, in ms.
    gap_mean_ms: float
    gap_min_ms: float
    gap_max_ms: float
    reads_per_stream: float
    last_chunk_ms: float


@dataclass
class Report:
    machine: dict[str, object]
    settings: dict[str, object]
    cases: list[CaseResult] = field(default_factory=list)
    probes: list[ProbeResult] = field(default_factory=list)
    chunks: list[ChunkResult] = field(default_factory=list)


# --- report -------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def _spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    clean = [v for v in values if v == v]
    if not clean:
        return "-"
    if len(clean) == 1:
        return fmt.format(clean[0])
    return f"{fmt.format(statistics.median(clean))} ({fmt.format(min(clean))}-{fmt.format(max(clean))})"


def _per_round(report: Report, mix: str, conc: int, fn: Callable[[dict[str, CaseResult]], float | None]) -> list[float]:
    rounds: dict[int, dict[str, CaseResult]] = {}
    for case in report.cases:
        if case.mix == mix and case.concurrency == conc:
            rounds.setdefault(case.round, {})[case.target] = case
    out = []
    for by_target in rounds.values():
        try:
            value = fn(by_target)
        except (KeyError, ZeroDivisionError, TypeError):
            value = None
        if value is not None:
            out.append(value)
    return out


def render(report: Report) -> str:
    targets = list(dict.fromkeys(c.target for c in report.cases))
    mixes = list(dict.fromkeys(c.mix for c in report.cases))
    concs = sorted({c.concurrency for c in report.cases})
    lines = [
        f"machine: {report.machine}",
        f"settings: {report.settings}",
        "",
        "### Raw figures (median over rounds)",
        "",
        "| mix | conc | target | req/s | p50 ms | p99 ms | +p50 ms | +p99 ms | CPU ms/req | proxy core | driver core |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mix in mixes:
        for conc in concs:
            for target in targets:
                rows = [c for c in report.cases if c.mix == mix and c.concurrency == conc and c.target == target]
                if not rows:
                    continue
                added50 = _per_round(report, mix, conc, _added(target, "p50_ms"))
                added99 = _per_round(report, mix, conc, _added(target, "p99_ms"))
                cpu = [c.cpu_ms_per_request for c in rows if c.cpu_ms_per_request is not None]
                busy = [c.proxy_core_busy for c in rows if c.proxy_core_busy is not None]
                errors = sum(c.errors for c in rows)
                name = f"{target} ({errors} errors)" if errors else target
                direct = target == "direct"
                cells = [
                    mix,
                    str(conc),
                    name,
                    f"{_median([c.rps for c in rows]):.0f}",
                    f"{_median([c.p50_ms for c in rows]):.3f}",
                    f"{_median([c.p99_ms for c in rows]):.3f}",
                    "-" if direct else _spread(added50, "{:+.3f}"),
                    "-" if direct else _spread(added99, "{:+.3f}"),
                    _spread(cpu, "{:.3f}") if cpu else "-",
                    f"{_median(busy):.0%}" if busy else "-",
                    f"{_median([c.driver_core_busy for c in rows]):.0%}",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Ratios (per round, then median (min-max) over rounds)",
        "",
        "| mix | conc | sidecar/ideal CPU per req | sidecar/ideal peak req/s | litellm/sidecar CPU per req "
        "| sidecar/ideal added p50 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mix in mixes:
        for conc in concs:
            cpu_ratio = _per_round(
                report, mix, conc, lambda r: _div(r["sidecar"].cpu_ms_per_request, r["ideal"].cpu_ms_per_request)
            )
            rps_ratio = _per_round(report, mix, conc, lambda r: r["sidecar"].rps / r["ideal"].rps)
            ll_ratio = _per_round(
                report, mix, conc, lambda r: _div(r["litellm"].cpu_ms_per_request, r["sidecar"].cpu_ms_per_request)
            )
            lat_ratio = _per_round(
                report,
                mix,
                conc,
                lambda r: (r["sidecar"].p50_ms - r["direct"].p50_ms) / (r["ideal"].p50_ms - r["direct"].p50_ms),
            )
            lines.append(
                f"| {mix} | {conc} | {_spread(cpu_ratio)} | {_spread(rps_ratio)} | {_spread(ll_ratio, '{:.1f}')} "
                f"| {_spread(lat_ratio)} |"
            )
    if any(c.target == "sidecar-b" for c in report.cases):
        lines += [
            "",
            "### sidecar-b (--compare-src) against sidecar, same run",
            "",
            "| mix | conc | b/a CPU per req | b/a req/s | b/ideal CPU per req | b/ideal req/s | b added p50 ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for mix in mixes:
            for conc in concs:
                cpu_ab = _per_round(report, mix, conc, _cpu_ratio("sidecar-b", "sidecar"))
                rps_ab = _per_round(report, mix, conc, lambda r: r["sidecar-b"].rps / r["sidecar"].rps)
                cpu_bi = _per_round(report, mix, conc, _cpu_ratio("sidecar-b", "ideal"))
                rps_bi = _per_round(report, mix, conc, lambda r: r["sidecar-b"].rps / r["ideal"].rps)
                added_b = _per_round(report, mix, conc, _added("sidecar-b", "p50_ms"))
                lines.append(
                    f"| {mix} | {conc} | {_spread(cpu_ab)} | {_spread(rps_ab)} | {_spread(cpu_bi)} "
                    f"| {_spread(rps_bi)} | {_spread(added_b, '{:+.3f}')} |"
                )
    if report.probes:
        lines += [
            "",
            "### Time to first streamed byte, concurrency 1 (bench.loadgen probe)",
            "",
            "| mix | target | TTFB p50 ms | TTFB p99 ms | added TTFB p50 ms (per round) |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for mix in dict.fromkeys(p.mix for p in report.probes):
            for target in dict.fromkeys(p.target for p in report.probes):
                probes = [p for p in report.probes if p.mix == mix and p.target == target]
                added = []
                for p in probes:
                    base = [q for q in report.probes if q.mix == mix and q.round == p.round and q.target == "direct"]
                    if base:
                        added.append(p.ttfb_p50_ms - base[0].ttfb_p50_ms)
                lines.append(
                    f"| {mix} | {target} | {_median([p.ttfb_p50_ms for p in probes]):.3f} "
                    f"| {_median([p.ttfb_p99_ms for p in probes]):.3f} "
                    f"| {_spread(added, '{:+.3f}') if target != 'direct' else '-'} |"
                )
    if report.chunks:
        lines += [
            "",
            f"### Inter-chunk timing: upstream sends {STREAM_CHUNKS + 2} SSE events {GAP_MS} ms apart",
            "",
            "| target | streams | reads/stream | gap mean ms | gap min ms | gap max ms | last event at ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in report.chunks:
            lines.append(
                f"| {c.target} | {c.requests} | {c.reads_per_stream:.1f} | {c.gap_mean_ms:.2f} | {c.gap_min_ms:.2f} "
                f"| {c.gap_max_ms:.2f} | {c.last_chunk_ms:.1f} |"
            )
    lines += ["", *verdicts(report)]
    return "\n".join(lines)


def _peak_ratio(report: Report, mix: str, a: str = "sidecar", b: str = "ideal") -> list[float]:
    """Per round: the best req/s of ``a`` over all concurrencies / the best of ``b``."""
    out = []
    for round_no in sorted({c.round for c in report.cases}):
        best = {
            name: max(
                (c.rps for c in report.cases if c.mix == mix and c.round == round_no and c.target == name), default=0.0
            )
            for name in (a, b)
        }
        if best[a] and best[b]:
            out.append(best[a] / best[b])
    return out


def _added(target: str, attr: str) -> Callable[[dict[str, CaseResult]], float | None]:
    def added(by_target: dict[str, CaseResult]) -> float | None:
        return float(getattr(by_target[target], attr)) - float(getattr(by_target["direct"], attr))

    return added


def _cpu_ratio(a: str, b: str) -> Callable[[dict[str, CaseResult]], float | None]:
    def ratio(by_target: dict[str, CaseResult]) -> float | None:
        return _div(by_target[a].cpu_ms_per_request, by_target[b].cpu_ms_per_request)

    return ratio


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def verdicts(report: Report) -> list[str]:
    """The issue's targets, each with the measured figure and the margin."""
    out = ["### Targets"]

    def line(name: str, value: float, limit: float, higher_is_better: bool, unit: str = "") -> None:
        if value != value:
            out.append(f"- {name}: not measured")
            return
        ok = value >= limit if higher_is_better else value <= limit
        margin = value - limit
        word = "MET" if ok else "MISSED"
        out.append(
            f"- {name}: {value:.3f}{unit} vs {'>=' if higher_is_better else '<='} {limit}{unit} -> {word}"
            + ("" if ok else f" by {abs(margin):.3f}{unit} ({abs(margin) / limit:.0%})")
        )

    line(
        "conc 1 json-small: sidecar added p50",
        _median(_per_round(report, "json-small", 1, _added("sidecar", "p50_ms"))),
        0.35,
        False,
        " ms",
    )
    line(
        f"conc 1 json-small: sidecar added p99 ({report.settings.get('load_generator', 'load generator')}'s view;"
        " bench.wire_latency times it at the socket and with a C closed-loop client too)",
        _median(_per_round(report, "json-small", 1, _added("sidecar", "p99_ms"))),
        1.0,
        False,
        " ms",
    )
    if any(c.target == "sidecar-noreports" for c in report.cases):
        line(
            "conc 1 json-small: sidecar without outcome reports, added p99",
            _median(_per_round(report, "json-small", 1, _added("sidecar-noreports", "p99_ms"))),
            1.0,
            False,
            " ms",
        )
    concs = sorted({c.concurrency for c in report.cases})
    top = concs[-1] if concs else 0
    for mix in ("json-small", "sse-small", "json-8k", "sse-8k"):
        cpu = _per_round(
            report, mix, top, lambda r: _div(r["sidecar"].cpu_ms_per_request, r["ideal"].cpu_ms_per_request)
        )
        line(f"conc {top} {mix}: sidecar CPU/request vs ideal", _median(cpu), 2.0, False, "x")
        line(
            f"{mix}: sidecar peak req/s vs ideal (best concurrency each)",
            _median(_peak_ratio(report, mix)),
            0.6,
            True,
            "x",
        )
        ll = _per_round(
            report, mix, top, lambda r: _div(r["litellm"].cpu_ms_per_request, r["sidecar"].cpu_ms_per_request)
        )
        line(f"conc {top} {mix}: LiteLLM CPU/request vs sidecar", _median(ll), 20.0, True, "x")
    for mix in ("sse-small", "sse-8k"):
        added = []
        for p in report.probes:
            if p.mix == mix and p.target == "sidecar":
                direct = [q for q in report.probes if q.mix == mix and q.round == p.round and q.target == "direct"]
                if direct:
                    added.append(p.ttfb_p50_ms - direct[0].ttfb_p50_ms)
        line(f"conc 1 {mix}: sidecar added TTFB p50", _median(added), 0.5, False, " ms")
    for c in report.chunks:
        if c.target == "sidecar":
            line("sidecar inter-chunk gap (mean, upstream 20 ms)", c.gap_mean_ms, GAP_MS * 0.9, True, " ms")
    return out
