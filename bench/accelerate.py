"""A whole PyTorch model with its GRU run by gru_fast (``converters.from_torch.accelerate``), end to end.

    python -m bench.accelerate [--quick] [--rounds N]

The model: Conv1d(40 -> 128, k=5) + ReLU, a 2-layer bidirectional nn.GRU (H=256, batch_first), a linear
head (512 -> 10) on every step; input (B=1, 40 channels, T=100), float32.  Both models are built from the
same weights (the accelerated one is a deep copy passed through ``accelerate``), run under
``torch.inference_mode()`` with ``THREADS`` threads, and timed interleaved round by round
(:func:`bench.engines.time_interleaved`: a batch of calls per sample, engines shuffled each round).  The
result gives each side's median and quartiles, the speed-up of the medians and the spread of the per-round
speed-ups, the largest absolute difference of the outputs, and the load average around the run (the
machine may be shared).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics

from . import THREADS
from .engines import Runner, time_interleaved

__all__ = ["build_model", "run", "markdown", "SHAPE"]

SHAPE = dict(batch=1, channels=40, steps=100, features=128, hidden=256, num_layers=2, classes=10)


def build_model(seed: int = 0):
    """The conv + 2-layer bidirectional GRU (H=256) + linear model, in eval mode."""
    import torch

    class ConvGRU(torch.nn.Module):
        def __init__(self, s):
            super().__init__()
            self.conv = torch.nn.Conv1d(s["channels"], s["features"], kernel_size=5, padding=2)
            self.gru = torch.nn.GRU(s["features"], s["hidden"], num_layers=s["num_layers"], bidirectional=True,
                                    batch_first=True)
            self.head = torch.nn.Linear(2 * s["hidden"], s["classes"])

        def forward(self, x):  # (B, C, T) -> (B, T, classes)
            y, _ = self.gru(torch.relu(self.conv(x)).transpose(1, 2))
            return self.head(y)

    torch.manual_seed(seed)
    return ConvGRU(SHAPE).eval()


class _ModelRunner(Runner):
    def __init__(self, model, x, label):
        super().__init__()
        import torch

        self._torch = torch
        self.engine = label
        self.result = None

        def call():
            self.result = model(x)
        self.call = call

    def context(self):
        return self._torch.inference_mode()


def run(quick: bool = False, rounds: int | None = None, batch_seconds: float | None = None, seed: int = 0) -> dict:
    """Time the model in torch and accelerated; returns the record (JSON values)."""
    import torch

    from converters import from_torch

    reference = build_model(seed)
    accelerated = from_torch.accelerate(copy.deepcopy(reference))
    x = torch.randn(SHAPE["batch"], SHAPE["channels"], SHAPE["steps"], generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        max_abs_err = float((accelerated(x) - reference(x)).abs().max())
    runners = {"pytorch": _ModelRunner(reference, x, "pytorch"), "accelerated": _ModelRunner(accelerated, x, "gru_fast")}
    rounds = rounds or (5 if quick else 21)
    load_before = list(os.getloadavg())
    # rounds stop early (after at least 3) once the budget is spent: a busy machine must not stretch the report
    timings = time_interleaved(runners, rounds, batch_seconds or (0.02 if quick else 0.1), seed, gap_seconds=0.03,
                               budget_seconds=5.0 if quick else 40.0)
    load_after = list(os.getloadavg())
    per_round = [t / a for t, a in zip(timings["pytorch"].samples_us, timings["accelerated"].samples_us)]
    q = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else per_round * 3
    return {
        "shape": dict(SHAPE), "threads": torch.get_num_threads(), "rounds": len(per_round),
        "max_abs_err": max_abs_err,
        "timings": {name: t.as_dict() for name, t in timings.items()},
        "speedup_of_medians": timings["pytorch"].median_us / timings["accelerated"].median_us,
        "speedup_per_round": {"median": statistics.median(per_round), "q1": q[0], "q3": q[2],
                              "min": min(per_round), "max": max(per_round)},
        "load_average_before": load_before, "load_average_after": load_after,
    }


def markdown(result: dict) -> str:
    """The report's section."""
    if "error" in result:
        return f"## A PyTorch model accelerated\n\n{result['error']}\n"
    s, t, r = result["shape"], result["timings"], result["speedup_per_round"]
    busy = max(result["load_average_before"][0], result["load_average_after"][0]) > 0.7
    lines = [
        "## A PyTorch model accelerated (`from_torch.accelerate`)",
        "",
        f"Conv1d({s['channels']}->{s['features']}) + {s['num_layers']}-layer bidirectional nn.GRU "
        f"(H={s['hidden']}) + Linear, B={s['batch']}, T={s['steps']}, float32, {result['threads']} threads, "
        f"end to end under torch.inference_mode(); {result['rounds']} interleaved rounds, max |difference| "
        f"{result['max_abs_err']:.1e}."
        + ("  **busy machine (load average above 0.7): times are noisy**" if busy else ""),
        "",
        "| model | median us | q1 - q3 us | fastest round us |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (("pytorch", "PyTorch"), ("accelerated", "accelerated (gru_fast GRU)")):
        lines.append(f"| {label} | {t[name]['median_us']:,.0f} | {t[name]['q1_us']:,.0f} - {t[name]['q3_us']:,.0f} "
                     f"| {t[name]['min_us']:,.0f} |")
    lines += ["", f"Speed-up: **{result['speedup_of_medians']:.2f}x** (ratio of medians); per round median "
                  f"{r['median']:.2f}x, quartiles {r['q1']:.2f}-{r['q3']:.2f}x, range {r['min']:.2f}-{r['max']:.2f}x; fastest "
                  f"rounds {t['pytorch']['min_us'] / t['accelerated']['min_us']:.2f}x.",
              ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.accelerate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--json", action="store_true", help="print the record as JSON too")
    args = parser.parse_args(argv)
    from .engines import configure_threads

    configure_threads(THREADS)
    result = run(args.quick, args.rounds)
    print(markdown(result))
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
