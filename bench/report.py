"""Machine description, the sgemm ceiling, and the report: markdown tables, JSON and PNG charts."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from gru_fast.peers import busy_warning, quiet_rounds

from .cases import LATENCY_CASES, PARITY_TOLERANCE
from . import THREADS
from .engines import ENGINE_LABELS, ENGINES

__all__ = ["busy_summary", "isolated_entry", "latency_rows", "machine_info", "measure_sgemm", "markdown",
           "round_spread", "write_json", "plot_ratios", "plot_scaling", "summarize_case"]

_VERSIONED = ("numpy", "numba", "scipy", "torch", "onnx", "onnxruntime", "openvino", "threadpoolctl",
              "gru_fast", "matplotlib", "pytest-benchmark")


# ----------------------------------------------------------------------------------------------------
# machine
# ----------------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    except OSError:
        pass
    return []


def machine_info() -> dict:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_simd_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def measure_sgemm(n: int = 2048, repeats: int = 5, threads: int = THREADS) -> dict:
    """Median GFLOP/s of an n x n x n float32 numpy matmul on ``threads`` BLAS threads (2 n^3 flops)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    try:
        import threadpoolctl
        limiter = threadpoolctl.threadpool_limits(limits=threads, user_api="blas")
    except ImportError:
        import contextlib
        limiter = contextlib.nullcontext()
    times = []
    with limiter:
        np.matmul(a, b, out=c)  # warm-up: page faults, BLAS thread start
        for _ in range(repeats):
            start = time.perf_counter()
            np.matmul(a, b, out=c)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"n": n, "threads": threads, "repeats": repeats, "median_s": median,
            "gflops": 2 * n ** 3 / median / 1e9, "best_gflops": 2 * n ** 3 / min(times) / 1e9}


# ----------------------------------------------------------------------------------------------------
# per-case summary
# ----------------------------------------------------------------------------------------------------

def summarize_case(case, engines: dict, sgemm_gflops: float | None) -> dict:
    """Ratio and target verdict of one case.

    ``engines``: name -> {"status": "ok" | "not installed ..." | "error ...", "median_us", "parity_err"}.
    A peer whose output disagrees with the reference is left out of "best peer" (and flagged); when
    gru_fast itself disagrees the target is not met, whatever the times.
    """
    gf = engines.get("gru_fast", {})
    peers = {name: e for name, e in engines.items()
             if name != "gru_fast" and e.get("median_us") is not None and e.get("parity_ok")}
    summary = {"best_peer": None, "best_peer_us": None, "ratio": None, "target": case.target,
               "sgemm_target": case.sgemm_target, "met": None, "notes": []}
    if peers:
        best = min(peers, key=lambda name: peers[name]["median_us"])
        summary["best_peer"], summary["best_peer_us"] = best, peers[best]["median_us"]
    for name, e in engines.items():
        if e.get("median_us") is not None and not e.get("parity_ok"):
            summary["notes"].append(f"{ENGINE_LABELS[name]} disagrees with the reference "
                                    f"(max abs err {e.get('parity_err'):.2e} > {PARITY_TOLERANCE:g})")
    gf_us = gf.get("median_us")
    if gf_us is not None and summary["best_peer_us"] is not None:
        summary["ratio"] = summary["best_peer_us"] / gf_us
    if gf_us is not None:
        summary["gflops"] = case.flops / (gf_us * 1e-6) / 1e9
        if sgemm_gflops:
            summary["sgemm_fraction"] = summary["gflops"] / sgemm_gflops
    met = None
    if summary["ratio"] is not None:
        met = summary["ratio"] >= case.target
        if case.sgemm_target is not None:
            fraction = summary.get("sgemm_fraction")
            met = met and fraction is not None and fraction >= case.sgemm_target
        if not gf.get("parity_ok"):
            met = False
    summary["met"] = met
    return summary


def round_spread(timing: dict) -> tuple[float, float] | None:
    """(lowest, highest) per-call time of the rounds a timing's median is taken over (the quiet rounds,
    or every round when too few were quiet: :func:`gru_fast.peers.quiet_rounds`); None without samples."""
    samples = timing.get("samples_us") or []
    if not samples:
        return None
    shares = timing.get("busy_shares") or []
    keep = quiet_rounds(shares)[0] if len(shares) == len(samples) else range(len(samples))
    kept = [samples[i] for i in keep] or samples
    return min(kept), max(kept)


def isolated_entry(timing: dict) -> dict:
    """What the report keeps of one engine's timing in a child process of its own (``run_isolated``)."""
    spread = round_spread(timing)
    return {"median_us": timing["median_us"], "min_us": spread[0] if spread else None,
            "max_us": spread[1] if spread else None, "rounds": timing.get("rounds"), "busy": timing.get("busy"),
            "parity_ok": timing.get("parity_ok"), "parity_err": timing.get("parity_err")}


def _best(times: dict) -> tuple[str | None, dict | None]:
    """The fastest peer of ``times`` (engine -> {"median_us", "parity_ok", ...}) that agrees with the
    reference."""
    peers = {e: t for e, t in times.items() if e != "gru_fast" and isinstance(t, dict)
             and t.get("median_us") is not None and t.get("parity_ok")}
    if not peers:
        return None, None
    best = min(peers, key=lambda e: peers[e]["median_us"])
    return best, peers[best]


def latency_rows(report: dict) -> list[dict]:
    """Issue 13's latency rows: per case of :data:`bench.cases.LATENCY_CASES` in the report, gru_fast and
    the best peer interleaved in this process (the main table) and each alone in a process of its own
    (``report["isolated"]``, when run): median, the spread between rounds, ratio, target met."""
    rows = []
    isolated = report.get("isolated")
    for case in report.get("cases", []):
        if case["name"] not in LATENCY_CASES:
            continue
        row = {"name": case["name"], "shape": case["shape"], "target": case["target"]}
        interleaved = {}
        for engine, timing in case["engines"].items():
            if timing.get("median_us") is not None:
                spread = round_spread(timing)
                interleaved[engine] = dict(timing, min_us=spread[0], max_us=spread[1]) if spread else timing
        for mode, times in (("interleaved", interleaved),
                            ("alone", None if isolated is None else isolated.get(case["name"], {}))):
            if times is None:
                row[mode] = None
                continue
            gf = times.get("gru_fast")
            best, peer = _best(times)
            ratio = peer["median_us"] / gf["median_us"] if gf and peer else None
            met = None if ratio is None else (ratio >= case["target"] and bool(gf.get("parity_ok")))
            row[mode] = {"gru_fast": gf, "best_peer": best, "peer": peer, "ratio": ratio, "met": met}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# a busy machine
# ----------------------------------------------------------------------------------------------------

def busy_summary(report: dict) -> str | None:
    """The busy-machine warning the markdown and every chart carry, or None when every timing had
    enough quiet rounds (bench.engines.time_interleaved, the demo's rule)."""
    busy, shares = [], []
    for row in report.get("cases", []):
        timings = [e for e in row["engines"].values() if "busy_shares" in e]
        if timings:
            shares.extend(timings[0]["busy_shares"])  # one meter per round: the same for every engine
        if any(e.get("busy") for e in timings):
            busy.append(row["name"])
    for row in report.get("threads") or []:
        if any(t.get("busy") for t in (row.get("timings") or {}).values()):
            busy.append(f"1 vs 2 threads, {row['name']}")
    for axis, points in (report.get("scaling") or {}).items():
        busy += [f"scaling {p['shape']}" for p in points if p.get("busy")]
    busy += [f"sweep {p['shape']}" for p in (report.get("sweep") or {}).get("points", []) if p.get("busy")]
    busy += [f"bf16 {row['name']}" for row in (report.get("bf16") or {}).get("cases", []) if row.get("busy")]
    if not busy:
        return None
    share = sorted(shares)[len(shares) // 2] if shares else 1.0
    named = ", ".join(busy[:3]) + (f" and {len(busy) - 3} more" if len(busy) > 3 else "")
    return busy_warning(share, f"median of the rounds; too few quiet rounds in {named}")


# ----------------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------------

def _us(value) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def _engine_cell(e: dict) -> str:
    if e.get("median_us") is None:
        return e.get("status", "-")
    text = _us(e["median_us"])
    if not e.get("parity_ok"):
        text += " (MISMATCH)"
    return text


def _err(e: dict) -> str:
    err = e.get("parity_err", e.get("max_abs_err"))
    if err is None:
        return "-"
    flag = "" if err <= PARITY_TOLERANCE else " MISMATCH"
    return f"{err:.1e}{flag}"


def markdown(report: dict) -> str:
    lines = []
    machine = report["machine"]
    sgemm = report.get("sgemm") or {}
    lines.append(f"# gru_fast benchmark{' (quick mode)' if report['settings']['quick'] else ''}")
    lines.append("")
    lines.append(f"- CPU: {machine['cpu_model']} ({machine['usable_cores']} usable cores, "
                 f"{' '.join(machine['cpu_simd_flags'])}); {THREADS} threads for every engine")
    warning = busy_summary(report)
    if warning:
        lines.append(f"- **{warning}**")
    load = report.get("load_average_before"), report.get("load_average_after")
    if all(load):
        lines.append(f"- load average (1 min) before / after: {load[0][0]:.2f} / {load[1][0]:.2f} (after: "
                     "this run's own load included)")
    versions = machine["versions"]
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    if sgemm:
        lines.append(f"- sgemm ({sgemm['n']}^3 float32 numpy matmul, {sgemm['threads']} threads, best of "
                     f"{sgemm['repeats']}, the rate the % sgemm figures use): **{sgemm['best_gflops']:.0f} "
                     f"GFLOP/s** (median {sgemm['gflops']:.0f})")
    s = report["settings"]
    lines.append(f"- rounds per case: {s['rounds']}, batch ~{1e3 * s['batch_seconds']:.0f} ms of calls per "
                 f"sample, engines shuffled each round; times are median per call in microseconds over the "
                 f"quiet rounds (a round during which other processes used over a quarter of the CPUs is "
                 f"left out)")
    short = [f"{row['name']} ({min(e['rounds'] for e in row['engines'].values() if 'rounds' in e)})"
             for row in report["cases"]
             if any(e.get("rounds", s["rounds"]) < s["rounds"] for e in row["engines"].values())]
    if short:
        lines.append(f"- fewer rounds (time budget of {s['case_budget_seconds']:g} s per case reached, or busy "
                     "rounds left out): "
                     + ", ".join(short))
    lines.append("")

    engines = report["engines"]
    header = (["case", "shape"] + [f"{ENGINE_LABELS[e]} (us)" for e in engines]
              + ["best peer", "ratio", "target", "met?", "max abs err vs " + report.get("reference", "PyTorch")])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in report["cases"]:
        summary = row["summary"]
        target = f">= {row['target']:g}x"
        if row.get("sgemm_target"):
            target += f", >= {100 * row['sgemm_target']:.0f}% sgemm"
        ratio = "-" if summary["ratio"] is None else f"{summary['ratio']:.2f}x"
        if row.get("sgemm_target") and summary.get("sgemm_fraction") is not None:
            ratio += f" ({summary['gflops']:.0f} GFLOP/s = {100 * summary['sgemm_fraction']:.0f}% sgemm)"
        met = {True: "yes", False: "**no**", None: "-"}[summary["met"]]
        errs = ", ".join(f"{ENGINE_LABELS[e]} {_err(row['engines'][e])}" for e in engines
                         if row["engines"][e].get("parity_err") is not None)
        best = ENGINE_LABELS.get(summary["best_peer"], "-") if summary["best_peer"] else "-"
        cells = ([row["title"], row["shape"]] + [_engine_cell(row["engines"][e]) for e in engines]
                 + [best, ratio, target, met, errs or "-"])
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{row['name']}: {note}" for row in report["cases"] for note in row["summary"]["notes"]]
    notes += [f"{row['name']}: {ENGINE_LABELS[e]}: {row['engines'][e]['status']}" for row in report["cases"]
              for e in engines if row["engines"][e].get("status", "ok").startswith("error")]
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    lines.append("")
    lines.append("GFLOP/s = flops / time with flops = D*T*B*(2*3H*(I+H) + 12*H) (matrix products of the "
                 "input projection and the recurrence, plus element-wise work per unit and step).")

    isolated = report.get("isolated")
    if isolated:
        lines.append("")
        lines.append("## Each engine alone in a process")
        lines.append("")
        lines.append("The same cases, each engine timed in a child process of its own: no other engine's thread "
                     "pool lingers beside it (ONNX Runtime's intra-op threads keep waking for a few seconds after "
                     "its batches here, which slows whichever engine runs next, most of all one that needs both "
                     "cores at once).  The targets are judged on the table above.")
        lines.append("")
        present = [e for e in engines if any(e in v for v in isolated.values() if isinstance(v, dict))]
        lines.append("| case | " + " | ".join(f"{ENGINE_LABELS[e]} (us)" for e in present)
                     + " | best peer / gru_fast |")
        lines.append("|---|" + "---|" * (len(present) + 1))
        for row in report["cases"]:
            times = isolated.get(row["name"], {})
            _, peer = _best(times)
            ratio = (f"{peer['median_us'] / times['gru_fast']['median_us']:.2f}x"
                     if peer and times.get("gru_fast") else "")
            lines.append(f"| {row['name']} ({row['shape']}) | "
                         + " | ".join(_us(times.get(e, {}).get("median_us")) for e in present) + f" | {ratio} |")
        errors = [f"{e}: {v['error']}" for e, v in isolated.items() if isinstance(v, dict) and "error" in v]
        if errors:
            lines.append("")
            lines.extend(f"- child process failed: {e}" for e in errors)

    lines.extend(_latency_markdown(report))

    threads = report.get("threads")
    if threads:
        lines.append("")
        lines.append("## gru_fast, 1 vs 2 threads")
        lines.append("")
        lines.append("| case | shape | 1 thread (us) | 2 threads (us) | speed-up |")
        lines.append("|---|---|---|---|---|")
        for row in threads:
            if row.get("error"):
                lines.append(f"| {row['name']} | {row['shape']} | error: {row['error']} | | |")
                continue
            speedup = row["us"]["1"] / row["us"]["2"] if row["us"].get("2") else None
            lines.append(f"| {row['name']} | {row['shape']} | {_us(row['us'].get('1'))} | "
                         f"{_us(row['us'].get('2'))} | {'-' if speedup is None else f'{speedup:.2f}x'} |")

    cold = report.get("cold_start")
    if cold:
        lines.append("")
        lines.append(f"## Cold start and peak memory ({cold['case']}: {cold['shape']})")
        lines.append("")
        lines.append("Fresh process: import, load the saved model, first output. Wall time measured by the "
                     "parent (interpreter start to exit); the split is measured inside the process. Peak RSS: the "
                     "child's VmHWM (ru_maxrss of a vfork+exec child starts at the parent's peak).")
        lines.append("")
        lines.append("| engine | wall (s) | import (s) | load (s) | first output (s) | peak RSS (MiB) "
                     "| max abs err (last step) |")
        lines.append("|---|---|---|---|---|---|---|")
        for name, r in cold.items():
            if not isinstance(r, dict):
                continue
            if "skipped" in r or "error" in r:
                lines.append(f"| {name} | {r.get('skipped') or r.get('error')} | | | | | |")
                continue
            lines.append(f"| {name} | {r['wall_s']:.2f} | {r['import_s']:.2f} | {r['load_s']:.3f} | "
                         f"{r['first_output_s']:.3f} | {r['peak_rss_mib']:.0f} | {_err(r)} |")

    scaling = report.get("scaling")
    if scaling:
        lines.append("")
        lines.append("## Scaling (median us per call)")
        for axis, points in scaling.items():
            lines.append("")
            present = [e for e in engines if any(p["us"].get(e) is not None for p in points)]
            lines.append(f"| {axis} | shape | " + " | ".join(ENGINE_LABELS[e] for e in present) + " |")
            lines.append("|---|---|" + "---|" * len(present))
            for p in points:
                lines.append(f"| {p['value']} | {p['shape']} | "
                             + " | ".join(_us(p["us"].get(e)) for e in present) + " |")
    lines.append("")
    return "\n".join(lines)


def _timed(t: dict | None) -> str:
    if not t:
        return "-"
    spread = f" ({_us(t['min_us'])}-{_us(t['max_us'])})" if t.get("min_us") is not None else ""
    return _us(t["median_us"]) + spread + ("" if t.get("parity_ok", True) else " MISMATCH")


def _latency_markdown(report: dict) -> list[str]:
    rows = latency_rows(report)
    if not rows:
        return []
    lines = ["", "## Latency rows (B=1..8): interleaved and each engine alone", ""]
    lines.append("Ratio = best float32 peer (PyTorch, ONNX Runtime, OpenVINO) / gru_fast; the target must hold in "
                 "both modes.  *Interleaved*: every engine in this process, shuffled each round (the main table). "
                 "*Alone*: each engine in a child process of its own, the same rounds.  Times: median us per call, "
                 "in brackets the spread between rounds (fastest-slowest round of the ones the median uses).")
    if report.get("isolated") is None:
        lines.append("")
        lines.append("*Alone*: not run in this report (`--quick` or `--no-isolated`; the full run's).")
    lines.append("")
    lines.append("| case | shape | target | interleaved: gru_fast | best peer | ratio | met? "
                 "| alone: gru_fast | best peer | ratio | met? |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [row["name"], row["shape"], f">= {row['target']:g}x"]
        for mode in ("interleaved", "alone"):
            m = row[mode]
            if m is None:
                cells += ["not run", "", "", ""]
                continue
            peer = f"{ENGINE_LABELS[m['best_peer']]} {_timed(m['peer'])}" if m["best_peer"] else "-"
            cells += [_timed(m["gru_fast"]), peer, "-" if m["ratio"] is None else f"{m['ratio']:.2f}x",
                      {True: "yes", False: "**no**", None: "-"}[m["met"]]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------

def write_json(report: dict, path: Path) -> None:
    def default(obj):
        if isinstance(obj, (np.floating, np.integer)):
            return obj.item()
        if isinstance(obj, Path):
            return str(obj)
        return str(obj)

    def clean(obj):
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    path.write_text(json.dumps(clean(report), indent=1, default=default) + "\n")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path, report: dict) -> None:
    """Write a chart; on a busy machine with the report's warning across its top, in red."""
    warning = busy_summary(report)
    if warning:
        import textwrap
        text = textwrap.fill(warning, int(16 * fig.get_figwidth()))  # ~16 characters an inch at 8 pt
        reserved = (0.15 * (text.count("\n") + 1) + 0.1) / fig.get_figheight()  # ~0.15 inch a line
        fig.tight_layout(rect=(0, 0, 1, 1 - reserved))
        fig.text(0.5, 0.995, text, ha="center", va="top", fontsize=8, color="red", weight="bold")
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_ratios(report: dict, path: Path) -> bool:
    """Bar chart: best-peer / gru_fast ratio per case, with each case's target marked."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = [r for r in report["cases"] if r["summary"]["ratio"] is not None]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
    xs = np.arange(len(rows))
    ratios = [r["summary"]["ratio"] for r in rows]
    colors = ["tab:green" if r["summary"]["met"] else "tab:red" for r in rows]
    ax.bar(xs, ratios, color=colors, width=0.6, label="best peer / gru_fast")
    for i, r in enumerate(rows):
        ax.hlines(r["target"], i - 0.4, i + 0.4, colors="black", linewidth=2,
                  label="target" if i == 0 else None)
        ax.text(i, ratios[i], f"{ratios[i]:.2f}x\n{ENGINE_LABELS.get(r['summary']['best_peer'], '')}",
                ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{r['name']}\n{r['shape']}" for r in rows], fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("best peer time / gru_fast time")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_title(f"gru_fast vs best peer ({THREADS} threads, float32)"
                 + (" - quick mode" if report["settings"]["quick"] else ""))
    ax.legend(fontsize=8)
    _save(fig, path, report)
    plt.close(fig)
    return True


def plot_scaling(report: dict, path: Path) -> bool:
    """Log-log time per call vs T, B and H for every engine."""
    plt = _pyplot()
    scaling = report.get("scaling")
    if plt is None or not scaling:
        return False
    fig, axes = plt.subplots(1, len(scaling), figsize=(5 * len(scaling), 4.2))
    axes = np.atleast_1d(axes)
    markers = dict(zip(ENGINES, "osD^"))
    for ax, (axis, points) in zip(axes, scaling.items()):
        for engine in report["engines"]:
            pts = [(p["value"], p["us"][engine]) for p in points if p["us"].get(engine) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=markers.get(engine, "o"), label=ENGINE_LABELS[engine])
        fixed = points[0]["fixed"]
        ax.set_xscale("log")
        ax.set_yscale("log")
        values = [p["value"] for p in points]
        ax.set_xticks(values)
        ax.set_xticklabels([str(v) for v in values])
        ax.minorticks_off()
        ax.set_xlabel(axis)
        ax.set_ylabel("median time per call (us)")
        ax.set_title(f"time vs {axis} ({fixed})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path, report)
    plt.close(fig)
    return True
