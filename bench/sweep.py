"""The small-batch sweep: best peer / gru_fast at every B x H of a grid, as a table and a heat map.

B in :data:`BATCHES` x H in :data:`HIDDEN` (odd sizes included), T=200, I=64, forward, ``THREADS``
threads, float32.  Every point is a case of its own: the engines built from the same weights, checked
against PyTorch, and timed in interleaved rounds in this one process (:func:`gru_fast.peers.time_interleaved`,
fewer rounds than the main cases: 36 points).  Target (issue 13): gru_fast at least :data:`TARGET` times
faster than the best peer at every point.  ``--quick`` runs a corner of the grid (:data:`QUICK_BATCHES` x
:data:`QUICK_HIDDEN`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import THREADS
from .cases import Case, make_problem
from .engines import ENGINE_LABELS, Artifacts, build_engines, time_rows
from .report import _pyplot, _save, summarize_case

__all__ = ["BATCHES", "HIDDEN", "INPUT_SIZE", "STEPS", "TARGET", "grid", "markdown", "plot", "ratio_grid", "run",
           "sweep_cases"]

BATCHES = (1, 2, 3, 4, 6, 8)
HIDDEN = (96, 128, 192, 256, 320, 384)
QUICK_BATCHES = (1, 3)
QUICK_HIDDEN = (96, 320)
STEPS = 200
INPUT_SIZE = 64
TARGET = 1.3


def grid(quick: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(batch sizes, hidden sizes) of the sweep."""
    return (QUICK_BATCHES, QUICK_HIDDEN) if quick else (BATCHES, HIDDEN)


def sweep_cases(quick: bool) -> list[Case]:
    batches, hidden = grid(quick)
    return [Case(f"B={b} H={h}", "sweep", b, STEPS, INPUT_SIZE, h, target=TARGET) for b in batches for h in hidden]


def run(engines, quick: bool, rounds: int, batch_seconds: float, gap_seconds: float, budget_seconds: float,
        workdir, seed: int = 0, log=print) -> dict:
    """Every point of the grid -> {"batches", "hidden", "steps", "input_size", "target", "rounds",
    "points": [{"batch", "hidden", "shape", "engines": name -> row, "summary": ...}]}."""
    batches, hidden = grid(quick)
    result = {"batches": list(batches), "hidden": list(hidden), "steps": STEPS, "input_size": INPUT_SIZE,
              "target": TARGET, "threads": THREADS, "rounds": rounds, "batch_seconds": batch_seconds,
              "points": []}
    for case in sweep_cases(quick):
        log(f"  sweep {case.shape}")
        artifacts = Artifacts(make_problem(case, seed), Path(workdir) / "sweep" / case.name.replace(" ", "_"))
        runners, rows = build_engines(artifacts, engines, log=log)
        busy = time_rows(runners, rows, rounds, batch_seconds, seed, gap_seconds=gap_seconds,
                         budget_seconds=budget_seconds)
        summary = summarize_case(case, rows, None)
        result["points"].append({"batch": case.batch, "hidden": case.hidden_size, "shape": case.shape,
                                 "engines": rows, "summary": summary, "busy": busy})
        log(f"    ratio {summary['ratio'] and round(summary['ratio'], 2)} ({summary['best_peer']})")
    return result


def ratio_grid(sweep: dict) -> np.ndarray:
    """The ratios as a (len(batches), len(hidden)) array, NaN where a point has none."""
    batches, hidden = sweep["batches"], sweep["hidden"]
    ratios = np.full((len(batches), len(hidden)), np.nan)
    for point in sweep["points"]:
        ratio = point["summary"]["ratio"]
        if ratio is not None and point["batch"] in batches and point["hidden"] in hidden:
            ratios[batches.index(point["batch"]), hidden.index(point["hidden"])] = ratio
    return ratios


def markdown(sweep: dict) -> str:
    batches, hidden = sweep["batches"], sweep["hidden"]
    ratios = ratio_grid(sweep)
    met = [p["summary"]["met"] for p in sweep["points"]]
    lines = [f"## Sweep: best peer / gru_fast, B x H (T={sweep['steps']}, I={sweep['input_size']}, forward, "
             f"{sweep['threads']} threads, float32)", ""]
    lines.append(f"Each point is a case of its own: every engine built from the same weights, checked against "
                 f"PyTorch, and timed in {sweep['rounds']} interleaved rounds in one process (engines shuffled each "
                 f"round, batches of ~{1e3 * sweep['batch_seconds']:.0f} ms); a peer that disagrees with PyTorch "
                 f"is left out of the best peer.  Target: >= {sweep['target']:g}x at every point; cells under it "
                 f"(before rounding) are in bold.  Heat map: `*-sweep.png`.")
    lines.append("")
    lines.append("| B \\ H | " + " | ".join(str(h) for h in hidden) + " |")
    lines.append("|---|" + "---|" * len(hidden))
    for i, b in enumerate(batches):
        cells = []
        for j in range(len(hidden)):
            r = ratios[i, j]
            cells.append("-" if np.isnan(r) else (f"{r:.2f}x" if r >= sweep["target"] else f"**{r:.2f}x**"))
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines.append("")
    measured = [m for m in met if m is not None]
    lines.append(f"Target met at {sum(measured)} of {len(measured)} points measured"
                 + (f" ({len(met) - len(measured)} without a ratio)" if len(measured) < len(met) else "")
                 + (f"; lowest {np.nanmin(ratios):.2f}x" if not np.all(np.isnan(ratios)) else "") + ".")
    lines.append("")
    lines.append("| point | " + " | ".join(f"{ENGINE_LABELS[e]} (us)" for e in _engines(sweep))
                 + " | best peer | ratio |")
    lines.append("|---|" + "---|" * (len(_engines(sweep)) + 2))
    for p in sweep["points"]:
        cells = []
        for e in _engines(sweep):
            row = p["engines"].get(e, {})
            us = row.get("median_us")
            cell = row.get("status", "-") if us is None else (f"{us:,.0f}" if us >= 100 else f"{us:.1f}")
            if us is not None and not row.get("parity_ok"):
                cell += " (MISMATCH)"
            cells.append(cell)
        s = p["summary"]
        lines.append(f"| {p['shape']} | " + " | ".join(cells)
                     + f" | {ENGINE_LABELS.get(s['best_peer'], '-')} | "
                     + ("-" if s["ratio"] is None else f"{s['ratio']:.2f}x") + " |")
    lines.append("")
    return "\n".join(lines)


def _engines(sweep: dict) -> list[str]:
    seen = []
    for p in sweep["points"]:
        seen += [e for e in p["engines"] if e not in seen]
    return seen


def plot(report: dict, path: Path) -> bool:
    """Heat map of the sweep's ratios (B rows, H columns), each cell labelled, the target the colour
    scale's centre (green above, red below)."""
    plt = _pyplot()
    sweep = report.get("sweep")
    if plt is None or not sweep or not sweep.get("points"):
        return False
    from matplotlib.colors import TwoSlopeNorm

    ratios = ratio_grid(sweep)
    target = sweep["target"]
    finite = ratios[np.isfinite(ratios)]
    low = min(float(finite.min()) if finite.size else target, target * 0.8)
    high = max(float(finite.max()) if finite.size else target, target * 1.25)
    fig, ax = plt.subplots(figsize=(1.0 * len(sweep["hidden"]) + 2.5, 0.6 * len(sweep["batches"]) + 2.0))
    image = ax.imshow(np.ma.masked_invalid(ratios), cmap="RdYlGn", norm=TwoSlopeNorm(target, low, high),
                      aspect="auto", origin="lower")
    for i in range(ratios.shape[0]):
        for j in range(ratios.shape[1]):
            r = ratios[i, j]
            ax.text(j, i, "n/a" if np.isnan(r) else f"{r:.2f}x", ha="center", va="center", fontsize=8,
                    weight="normal" if np.isnan(r) or r >= target else "bold")
    ax.set_xticks(range(len(sweep["hidden"])))
    ax.set_xticklabels([str(h) for h in sweep["hidden"]])
    ax.set_yticks(range(len(sweep["batches"])))
    ax.set_yticklabels([str(b) for b in sweep["batches"]])
    ax.set_xlabel("H")
    ax.set_ylabel("B")
    ax.set_title(f"best peer / gru_fast, T={sweep['steps']} I={sweep['input_size']}, {sweep['threads']} threads "
                 f"(target >= {target:g}x)" + (" - quick mode" if report["settings"]["quick"] else ""), fontsize=9)
    fig.colorbar(image, ax=ax, label="best peer time / gru_fast time")
    _save(fig, path, report)
    plt.close(fig)
    return True
