"""The bfloat16 table: gru_fast with bfloat16 weights against the float32 engines and OpenVINO's bf16 hint.

gru_fast's opt-in bfloat16 weights are ``model.with_weights("bfloat16")`` (a new model whose weights are
stored as bfloat16, state and arithmetic float32; ``model.weights`` says ``"bfloat16"``).  OpenVINO's
counterpart is its CPU plugin compiled with ``INFERENCE_PRECISION_HINT="bf16"``
(``gru_fast.peers.build_runner(..., openvino_precision="bf16")``), which it follows where the CPU has
bf16 instructions; the precision it compiled with is reported.

Per case of :data:`BF16_CASES`: gru_fast bf16 and float32, OpenVINO float32 and bf16, ONNX Runtime and
PyTorch (float32), built from the same weights and timed in interleaved rounds in one process
(:func:`gru_fast.peers.time_interleaved`).  Ratio: the best peer, OpenVINO bf16 counted as a peer, over
gru_fast bf16.  A float32 peer counts when it agrees with PyTorch within the usual 1e-4; OpenVINO bf16
when its max abs error against PyTorch float32 is within :data:`ERROR_TARGET`, the bar gru_fast bf16 has
to meet too.  Where this gru_fast has no ``with_weights`` (or it fails), the table says gru_fast bf16 is
unavailable and shows no figure for it.
"""

from __future__ import annotations

from pathlib import Path

from gru_fast import peers

from . import THREADS
from .cases import CASE_BY_NAME, PARITY_STEPS, make_problem
from .engines import Artifacts, build_engines, check_parity, missing_reason, parity_ok, time_rows

__all__ = ["BF16_CASES", "COLUMNS", "ERROR_TARGET", "LABELS", "bf16_model", "markdown", "run", "summarize"]

#: case name -> target ratio (best peer, OpenVINO bf16 included, / gru_fast bf16)
BF16_CASES = {"stream": 3.0, "latency": 2.0, "small_batch": 1.3}
#: max abs error against PyTorch float32 allowed for bfloat16 weights
ERROR_TARGET = 2e-2
GF_BF16, OV_BF16 = "gru_fast_bf16", "openvino_bf16"
COLUMNS = (GF_BF16, "gru_fast", "openvino", OV_BF16, "onnxruntime", "pytorch")
LABELS = {GF_BF16: "gru_fast bf16", "gru_fast": "gru_fast f32", "openvino": "OpenVINO f32",
          OV_BF16: "OpenVINO bf16 hint", "onnxruntime": "ONNX Runtime f32", "pytorch": "PyTorch f32"}
FLOAT32_PEERS = ("pytorch", "onnxruntime", "openvino")


def bf16_model(model):
    """``model`` with bfloat16 weights -> (model, None), or (None, why it is unavailable)."""
    with_weights = getattr(model, "with_weights", None)
    if with_weights is None:
        return None, ("this gru_fast has no GRU.with_weights: opt-in bfloat16 weights are not in this build")
    try:
        converted = with_weights("bfloat16")
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return None, f"model.with_weights('bfloat16') raised {type(exc).__name__}: {exc}"
    weights = getattr(converted, "weights", None)
    if weights != "bfloat16":
        return None, f"model.with_weights('bfloat16') returned a model whose .weights is {weights!r}"
    return converted, None


def summarize(rows: dict, target: float) -> dict:
    """Best peer, ratio and verdict of one case from its rows (name -> {"status", "median_us",
    "parity_err", ...}).  A float32 peer counts when :func:`parity_ok`; OpenVINO bf16 when its error is
    within :data:`ERROR_TARGET`.  met: ratio >= target and gru_fast bf16's error within ERROR_TARGET;
    None when gru_fast bf16 has no time."""
    counted = {}
    for name in (*FLOAT32_PEERS, OV_BF16):
        row = rows.get(name, {})
        if row.get("median_us") is None:
            continue
        ok = (row.get("parity_err") is not None and row["parity_err"] <= ERROR_TARGET) if name == OV_BF16 \
            else parity_ok(row.get("parity_err"))
        if ok:
            counted[name] = row["median_us"]
    gf = rows.get(GF_BF16, {})
    summary = {"target": target, "best_peer": None, "best_peer_us": None, "ratio": None, "met": None,
               "error_met": None, "bf16_speedup": None}
    if counted:
        summary["best_peer"] = min(counted, key=counted.get)
        summary["best_peer_us"] = counted[summary["best_peer"]]
    if gf.get("parity_err") is not None:
        summary["error_met"] = gf["parity_err"] <= ERROR_TARGET
    if gf.get("median_us") is not None:
        if summary["best_peer_us"] is not None:
            summary["ratio"] = summary["best_peer_us"] / gf["median_us"]
            summary["met"] = summary["ratio"] >= target and bool(summary["error_met"])
        if rows.get("gru_fast", {}).get("median_us") is not None:
            summary["bf16_speedup"] = rows["gru_fast"]["median_us"] / gf["median_us"]
    return summary


def _try(rows: dict, runners: dict, name: str, build, artifacts: Artifacts, log) -> None:
    try:
        runner = build()
        err = check_parity(runner, artifacts)
    except Exception as exc:  # noqa: BLE001 - an engine failing is a result
        rows[name] = {"status": f"error: {type(exc).__name__}: {exc}"}
        log(f"    {name}: {type(exc).__name__}: {exc}")
        return
    runners[name] = runner
    rows[name] = {"status": "ok", "parity_err": err, "config": runner.config}


def run(engines, quick: bool, rounds: int, batch_seconds: float, gap_seconds: float, budget_seconds: float,
        workdir, seed: int = 0, artifacts_by_case=None, log=print) -> dict:
    artifacts_by_case = artifacts_by_case or {}
    result = {"rounds": rounds, "batch_seconds": batch_seconds, "threads": THREADS, "cases": [],
              "gru_fast_bf16": None}
    for name, target in BF16_CASES.items():
        case = CASE_BY_NAME[name]
        log(f"  bf16 {name} ({case.shape})")
        artifacts = artifacts_by_case.get(name) or Artifacts(make_problem(case, seed), Path(workdir) / f"bf16-{name}")
        problem = artifacts.problem
        runners, rows = build_engines(artifacts, engines, log=log)
        if "gru_fast" in runners:
            model, reason = bf16_model(artifacts.gru_fast_model)
            if model is None:
                rows[GF_BF16] = {"status": f"unavailable: {reason}"}
                result["gru_fast_bf16"] = reason
            else:
                _try(rows, runners, GF_BF16,
                     lambda: peers.build_runner("gru_fast", problem.x, problem.h0, stream=case.stream, model=model),
                     artifacts, log)
        if "openvino" in engines:
            reason = missing_reason("openvino")
            if reason is not None:
                rows[OV_BF16] = {"status": reason}
            else:
                _try(rows, runners, OV_BF16,
                     lambda: peers.build_runner("openvino", problem.x, problem.h0, stream=case.stream,
                                                onnx_file=artifacts.onnx_path, threads=THREADS,
                                                openvino_precision="bf16"), artifacts, log)
                if OV_BF16 in runners:
                    rows[OV_BF16]["compiled_precision"] = runners[OV_BF16].config.get("INFERENCE_PRECISION_HINT")
        busy = time_rows(runners, rows, rounds, batch_seconds, seed, gap_seconds=gap_seconds,
                         budget_seconds=budget_seconds)
        result["cases"].append({"name": name, "shape": case.shape, "reference": artifacts.reference[2],
                                "engines": rows, "summary": summarize(rows, target), "busy": busy})
    return result


def _cell(row: dict) -> str:
    if row.get("median_us") is None:
        status = row.get("status", "-")
        return "unavailable" if status.startswith("unavailable") else status
    us = row["median_us"]
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}"


def _err(row: dict) -> str:
    err = row.get("parity_err")
    if err is None:
        return "-"
    return f"{err:.1e}" + ("" if err <= ERROR_TARGET else " (over)")


def markdown(bf16: dict) -> str:
    lines = ["## bfloat16 weights", ""]
    lines.append(f"gru_fast with `model.with_weights(\"bfloat16\")` (weights stored bf16, arithmetic float32) "
                 f"against the float32 engines and OpenVINO compiled with `INFERENCE_PRECISION_HINT=\"bf16\"`; "
                 f"all timed in {bf16['rounds']} interleaved rounds in one process, {bf16['threads']} threads, median "
                 f"us per call.  Ratio: best peer (OpenVINO bf16 counted) / gru_fast bf16.  Max abs error of y and "
                 f"h_n against PyTorch float32 on the case's inputs (a stream case: {PARITY_STEPS} steps); target <= "
                 f"{ERROR_TARGET:g}, which OpenVINO bf16 must also meet to count as a peer.")
    lines.append("")
    if bf16.get("gru_fast_bf16"):
        lines.append(f"**gru_fast bf16 is unavailable here: {bf16['gru_fast_bf16']}.**  Its column, the ratio and "
                     f"the verdict stay empty; no figure stands in for it.")
        lines.append("")
    header = (["case", "shape"] + [f"{LABELS[c]} (us)" for c in COLUMNS]
              + ["best peer", "ratio", "target", "met?", "err gru_fast bf16", "err OpenVINO bf16",
                 "gru_fast bf16 / f32 speed-up"])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    notes = []
    for row in bf16["cases"]:
        s, rows = row["summary"], row["engines"]
        met = {True: "yes", False: "**no**", None: "-"}[s["met"]]
        cells = ([row["name"], row["shape"]] + [_cell(rows.get(c, {})) for c in COLUMNS]
                 + [LABELS.get(s["best_peer"], "-") if s["best_peer"] else "-",
                    "-" if s["ratio"] is None else f"{s['ratio']:.2f}x", f">= {s['target']:g}x", met,
                    _err(rows.get(GF_BF16, {})), _err(rows.get(OV_BF16, {})),
                    "-" if s["bf16_speedup"] is None else f"{s['bf16_speedup']:.2f}x"])
        lines.append("| " + " | ".join(cells) + " |")
        precision = rows.get(OV_BF16, {}).get("compiled_precision")
        if precision is not None:
            followed = any(name in precision for name in ("bf16", "bfloat16"))
            notes.append(f"{row['name']}: OpenVINO with the bf16 hint compiled with inference precision {precision}"
                         + ("" if followed else " (the hint was not followed: no bf16 instructions on this CPU?)"))
        for name, r in rows.items():
            if r.get("median_us") is not None and name in FLOAT32_PEERS + ("gru_fast",) \
                    and not parity_ok(r.get("parity_err")):
                notes.append(f"{row['name']}: {LABELS[name]} disagrees with PyTorch (max abs err "
                             f"{r['parity_err']:.1e}), left out of the best peer")
        if row["reference"] != "PyTorch":
            notes.append(f"{row['name']}: errors are against {row['reference']}")
    lines.extend([""] + [f"- {n}" for n in notes] if notes else [])
    lines.append("")
    return "\n".join(lines)
