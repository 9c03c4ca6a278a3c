"""Hostile model files: mutated real models, crafted headers, pickle payloads.

gru_fast opens model files from strangers.  Every file below either loads as a correct model or is refused
with ValueError; nothing crashes, nothing allocates what a header claims without checking it, nothing from
the file runs.

Mutation fuzz (seeded, in child processes so a crash fails the test; each child lowers RLIMIT_AS to its
size after warm-up plus 1 GiB, so an allocation sized by an unchecked header surfaces as MemoryError and
fails the test instead of swapping the machine; the peak RSS growth is measured and reported):

* ONNX: three real models -- ``torch.onnx.export`` of a 2-layer bidirectional nn.GRU (constant folding
  off: the weights are chains of Slice / Concat / Unsqueeze), of a batch_first nn.GRU (folding on), and a
  one-node GRU with activations, clip, sequence_lens and initial_h -- each mutated by random byte
  overwrites, bit flips, truncation, insertion, deletion, duplicated spans, runs of 0x00/0xFF/0x7F/0x80,
  and byte overwrites inside the weight data.  ``converters.from_onnx.load(max_bytes=1 MiB)`` must refuse
  with ValueError/TypeError or return models whose outputs equal ONNX Runtime's run of that same mutated
  file (each GRU node's Y and Y_h exposed as graph outputs, its X / sequence_lens / initial_h taken from
  the same run), within 1e-5 absolute + 1e-5 relative.  ONNX Runtime's GRU is not exact for extreme
  weights (a recurrent weight of 3.7e31 flips a sign in its output where PyTorch, the ONNX reference
  evaluator and the float64 equations agree with each other and with gru_fast): when it disagrees, the
  ONNX reference evaluator reads the weights (folding the chains itself), ``onnx.helper`` the attributes,
  and the documented equations in float64 decide; such cases are counted as "adjudicated".  When ONNX
  Runtime cannot run the mutated file (a node the importer does not read is broken) there is no
  authority; those cases are counted, not passed.
* Engine files: ``gru_fast.save`` output (float32 bidirectional with activations, float64 without bias)
  mutated the same way, plus structure-aware mutations of the JSON configuration (a value replaced by a
  random JSON value).  ``gru_fast.load(max_bytes=1 MiB)`` must refuse with ValueError or load a model
  equal to the file's contents read independently (``np.load(allow_pickle=False)`` and ``json``), whose
  outputs equal ONNX Runtime's (float32) or the documented equations (float64, no ONNX runtime for it).
* PyTorch files: a ``torch.save`` state dict (.pt) and its ``np.savez`` form (.npz), mutated;
  ``converters.from_torch.load`` must refuse with ValueError or load a model equal to ``nn.GRU`` with
  the state dict ``torch.load(weights_only=True)`` / ``np.load`` reads from the same file.

Crafted files: headers claiming 1.2 GB in a file of a few KB (the .npy shape, the zip's declared sizes,
a torch record's size) are refused before allocating, under the same RLIMIT_AS; a config nested 100,000
deep is refused.  Pickle payloads in an engine .npz (config, weight, or an extra member) are refused and
a marker file shows they never ran (the control shows the payload is live).

Covered elsewhere, not repeated: truncated/garbage ONNX, absurd hidden_size and tensors claiming huge dims
refused before allocating, the max_bytes cap on legitimate ONNX models, external data escaping the model's
directory (tests/test_convert_onnx.py); malicious .pt pickles and object-array .npz through
from_torch.load (tests/test_convert_torch.py); object arrays through gru_fast.load (tests/test_io.py).
"""

from __future__ import annotations

import io
import json
import pickle
import textwrap
import zipfile

import numpy as np
import pytest

import gru_fast
from conftest import last_json_line, random_onnx_weights, run_python

CASES = {"onnx": 900, "engine": 900, "engine_config": 500, "torch": 700}

COMMON = textwrap.dedent(
    """
    import json
    import os
    import resource
    import sys
    import tempfile
    import warnings

    import numpy as np

    warnings.simplefilter("ignore")
    sys.path.insert(0, "tests")  # conftest's helpers; run_python starts the child in the repository root
    CASES = json.loads(sys.argv[1])
    WORK = tempfile.mkdtemp()

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    def limit_address_space(headroom=1 << 30):
        # from here on, any allocation that would take the process 1 GiB past its current size fails
        soft = status("VmSize") + headroom
        resource.setrlimit(resource.RLIMIT_AS, (soft, resource.getrlimit(resource.RLIMIT_AS)[1]))

    def peak_rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def mutate(data, r, spans=()):
        data = bytearray(data)
        n = len(data)
        op = int(r.integers(0, 10))
        if op >= 7 and spans:  # inside the weight bytes: a well-formed file with other numbers
            lo, hi = spans[r.integers(0, len(spans))]
            for _ in range(r.integers(1, 5)):
                data[r.integers(lo, hi)] = r.integers(0, 256)
            return bytes(data), "weights"
        op = min(op, 6)
        if op == 0:
            for _ in range(r.integers(1, 5)):
                data[r.integers(0, n)] = r.integers(0, 256)
        elif op == 1:
            for _ in range(r.integers(1, 4)):
                data[r.integers(0, n)] ^= 1 << int(r.integers(0, 8))
        elif op == 2:
            data = data[: r.integers(0, n)]
        elif op == 3:
            i = r.integers(0, n)
            data[i:i] = r.integers(0, 256, r.integers(1, 17), dtype=np.uint8).tobytes()
        elif op == 4:
            i = r.integers(0, n)
            del data[i : i + r.integers(1, 17)]
        elif op == 5:
            i, j = r.integers(0, n, 2)
            data[j:j] = data[i : i + r.integers(1, 65)]
        else:
            i, k = r.integers(0, n), r.integers(1, 9)
            data[i : i + k] = bytes([int(r.choice([0x00, 0xFF, 0x7F, 0x80, 0x01]))] * k)
        return bytes(data), ["overwrite", "bitflip", "truncate", "insert", "delete", "duplicate", "runs"][op]

    def close(got, want, rtol=1e-5, atol=1e-5):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        if got.shape != want.shape:
            return f"shape {got.shape} != {want.shape}"
        try:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError as exc:
            return str(exc)[:400]
        return None
    """
)

ONNX_CHILD = COMMON + textwrap.dedent(
    """
    import contextlib
    import io

    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from onnx.reference import ReferenceEvaluator

    from conftest import ACTIVATION_NAMES, gru_equations, onnx_gru_model, random_onnx_weights
    from converters import from_onnx

    torch.set_num_threads(1)
    CAP = 1 << 20

    def export(module, args, fold, opset, names):
        path = os.path.join(WORK, "seed.onnx")
        torch.onnx.export(module, args, path, dynamo=False, do_constant_folding=fold, opset_version=opset,
                          input_names=names[0], output_names=names[1])
        with open(path, "rb") as f:
            return f.read()

    torch.manual_seed(0)
    seeds = {
        "torch 2-layer bidirectional, unfolded": export(
            torch.nn.GRU(4, 6, num_layers=2, bidirectional=True).eval(),
            (torch.zeros(5, 2, 4), torch.zeros(4, 2, 6)), False, 14, (["input", "h0"], ["output", "h_n"])),
        "torch batch_first, folded": export(
            torch.nn.GRU(3, 5, batch_first=True).eval(), (torch.zeros(2, 5, 3),), True, 11,
            (["input"], ["output", "h_n"])),
    }
    W, R, B = random_onnx_weights(np.random.default_rng(0), 2, 3, 4)
    seeds["one node, activations, clip, sequence_lens, initial_h"] = onnx_gru_model(
        W, R, B, direction="bidirectional", linear_before_reset=1,
        activations=["HardSigmoid", "Tanh", "Sigmoid", "Softsign"], activation_alpha=[0.3],
        activation_beta=[0.6], clip=5.0, with_sequence_lens=True, with_initial_h=True).SerializeToString()

    OPTIONS = ort.SessionOptions()
    OPTIONS.intra_op_num_threads = OPTIONS.inter_op_num_threads = 1
    OPTIONS.log_severity_level = 4
    OPTIONS.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def weight_spans(data):
        model = onnx.load_from_string(data)
        tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute
                                                   if a.HasField("t")]
        spans = []
        for t in tensors:
            start = data.find(t.raw_data) if len(t.raw_data) >= 16 else -1
            if start >= 0:
                spans.append((start, start + len(t.raw_data)))
        return spans

    def gru_nodes(model):
        return [n for n in model.graph.node if n.op_type == "GRU" and n.domain in ("", "ai.onnx")]

    def feeds_for(model, converted):
        # graph inputs: the GRU nodes' X / sequence_lens / initial_h by role, others by declared shape
        graph = model.graph
        runtime = {vi.name for vi in graph.input} - {i.name for i in graph.initializer}
        feeds, r, T, Bsz = {}, np.random.default_rng(3), 5, 2
        for node, m in zip(gru_nodes(model), converted.values()):
            D, I, H = m.num_directions, m.input_size, m.hidden_size
            roles = {0: ((Bsz, T, I) if m.batch_first else (T, Bsz, I), np.float32), 4: ((Bsz,), np.int32),
                     5: ((Bsz, D, H) if m.batch_first else (D, Bsz, H), np.float32)}
            for index, (shape, dtype) in roles.items():
                name = node.input[index] if index < len(node.input) else ""
                if name in runtime and name not in feeds:
                    feeds[name] = (r.integers(1, T + 1, shape).astype(dtype) if dtype == np.int32
                                   else r.standard_normal(shape).astype(dtype))
        for vi in graph.input:
            if vi.name not in runtime or vi.name in feeds:
                continue
            t = vi.type.tensor_type
            if not t.HasField("shape") or t.elem_type not in (TensorProto.FLOAT, TensorProto.INT32):
                return None
            dims = [d.dim_value if d.dim_value > 0 else 2 for d in t.shape.dim]
            feeds[vi.name] = (r.standard_normal(dims).astype(np.float32) if t.elem_type == TensorProto.FLOAT
                              else r.integers(1, 3, dims).astype(np.int32))
        return feeds

    CANONICAL = {name.lower(): name for name in ACTIVATION_NAMES}

    def node_attributes(node):
        # the node's attributes as the ONNX specification defines them, read with onnx.helper alone
        raw = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        text = lambda v: v.decode() if isinstance(v, bytes) else v
        names = [CANONICAL[text(n).lower()] for n in raw["activations"]] if raw.get("activations") else None
        clip = raw.get("clip")
        return dict(direction=text(raw.get("direction", b"forward")),
                    linear_before_reset=bool(raw.get("linear_before_reset", 0)), activations=names,
                    activation_alpha=list(raw.get("activation_alpha", [])) or None,
                    activation_beta=list(raw.get("activation_beta", [])) or None,
                    clip=None if clip is None or np.isinf(clip) else float(clip))

    def adjudicate(model, feeds, node, m, x, h0, lengths, y, h_n):
        # ONNX Runtime disagreed: the ONNX reference evaluator reads the weights (folding the chains on
        # its own), onnx.helper the attributes, and the documented equations in float64 decide
        try:
            wanted = [node.input[i] if i < len(node.input) else "" for i in (1, 2, 3)]
            evaluator = ReferenceEvaluator(model)
            weights = evaluator.run([n for n in wanted if n], feeds)
        except Exception:
            return "no authority: ONNX Runtime disagreed and the reference evaluator cannot run the graph"
        weights = dict(zip([n for n in wanted if n], weights))
        W, R, Bias = (weights.get(n) if n else None for n in wanted)
        (mW, mR, mB), = m.onnx_weights()
        for mine, theirs in ((mW, W), (mR, R), (mB, Bias)):
            if (mine is None) != (theirs is None) or (
                    mine is not None and not np.array_equal(mine, np.asarray(theirs, np.float32))):
                return "MISMATCH: weights differ from the ONNX reference evaluator's"
        x_tb = x.transpose(1, 0, 2) if m.batch_first else x
        want_y, want_h = gru_equations(x_tb, [(W, R, Bias)], h0=h0, lengths=lengths, **node_attributes(node))
        if m.batch_first:
            want_y = want_y.transpose(1, 0, 2)
        problem = close(y, want_y) or close(h_n, want_h)
        return ("MISMATCH (ONNX Runtime and the documented equations both disagree) " + problem) if problem \
            else "adjudicated"

    def against_ort(data, converted):
        # -> "matched", "adjudicated", "no authority: ..." or "MISMATCH ..."
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # ORT prints its provider fallbacks
                model = onnx.load_from_string(data)
                feeds = feeds_for(model, converted)
                if feeds is None:
                    return "no authority: graph inputs of unknown shape"
                nodes = gru_nodes(model)
                exposed = {o.name for o in model.graph.output}
                for node in nodes:
                    for name in [node.input[0]] + list(node.input[4:6]) + list(node.output[:2]):
                        if name and name not in feeds and name not in exposed:
                            model.graph.output.append(helper.make_empty_tensor_value_info(name))
                            exposed.add(name)
                session = ort.InferenceSession(model.SerializeToString(), OPTIONS,
                                               providers=["CPUExecutionProvider"])
                values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        except Exception as exc:  # ORT (or onnx's helper) cannot run this mutated graph
            return "no authority: ONNX Runtime refused the mutated graph"
        values.update(feeds)
        adjudicated = []
        for node, m in zip(nodes, converted.values()):
            if len(node.output) < 2 or not all(node.output[:2]):
                return "no authority: the node does not output Y and Y_h"
            get = lambda i: values.get(node.input[i]) if i < len(node.input) and node.input[i] else None
            x, lengths, h0 = get(0), get(4), get(5)
            Y, Y_h = values[node.output[0]], values[node.output[1]]
            if m.batch_first:
                h0 = None if h0 is None else h0.transpose(1, 0, 2)
                want_y, want_h = Y.reshape(Y.shape[0], Y.shape[1], -1), Y_h.transpose(1, 0, 2)
            else:
                T, D, Bsz, H = Y.shape
                want_y, want_h = Y.transpose(0, 2, 1, 3).reshape(T, Bsz, D * H), Y_h
            try:
                y, h_n = m(x, h0, lengths)
            except (ValueError, TypeError) as exc:
                return f"MISMATCH: the converted model refused ONNX Runtime's inputs: {exc}"
            if close(y, want_y) or close(h_n, want_h):
                verdict = adjudicate(model, feeds, node, m, x, h0, lengths, y, h_n)
                if verdict != "adjudicated":
                    return verdict
                adjudicated.append(1)
        return "adjudicated" if adjudicated else "matched"

    # warm-up: every seed loads and matches ORT unmutated (the harness works), then the limits go on
    report = {"seeds": {}, "unexpected": [], "mismatches": []}
    for name, seed in seeds.items():
        path = os.path.join(WORK, "seed.onnx")
        with open(path, "wb") as f:
            f.write(seed)
        report["seeds"][name] = against_ort(seed, from_onnx.load(path, max_bytes=CAP, stack=False))
    limit_address_space()
    rss0 = peak_rss()
    report["stats"] = {}
    for seed_index, (name, seed) in enumerate(seeds.items()):
        spans = weight_spans(seed)
        s = report["stats"][name] = {"cases": 0, "refused": 0, "matched": 0, "adjudicated": 0, "no_authority": 0}
        path = os.path.join(WORK, "mutated.onnx")
        for case in range(CASES["onnx"]):
            data, how = mutate(seed, np.random.default_rng([seed_index, case]), spans)
            with open(path, "wb") as f:
                f.write(data)
            s["cases"] += 1
            try:  # the stack analysis reads the mutated graph too: it may refuse, never crash
                from_onnx.load(path, max_bytes=CAP, stack=True)
            except (ValueError, TypeError):
                pass
            except BaseException as exc:
                report["unexpected"].append([name, case, how, f"stack=True: {type(exc).__name__}: {exc}"[:300]])
            try:  # one model per node, each checked against ONNX Runtime
                converted = from_onnx.load(path, max_bytes=CAP, stack=False)
            except (ValueError, TypeError):
                s["refused"] += 1
                continue
            except BaseException as exc:
                report["unexpected"].append([name, case, how, f"{type(exc).__name__}: {exc}"[:300]])
                continue
            verdict = against_ort(data, converted)
            if verdict.startswith("MISMATCH"):
                report["mismatches"].append([name, case, how, verdict])
            elif verdict in ("matched", "adjudicated"):
                s[verdict] += 1
                if verdict == "adjudicated" and len(report.setdefault("adjudicated_examples", [])) < 5:
                    report["adjudicated_examples"].append([name, case, how])
            else:
                s["no_authority"] += 1
    report["peak_rss_growth"] = peak_rss() - rss0
    print(json.dumps(report))
    """
)

ENGINE_CHILD = COMMON + textwrap.dedent(
    """
    import torch

    import gru_fast
    from conftest import gru_equations, random_onnx_weights, run_onnxruntime
    from converters import from_torch

    torch.set_num_threads(1)
    CAP = 1 << 20
    rng = np.random.default_rng(0)

    def saved(model, name):
        path = os.path.join(WORK, name)
        gru_fast.save(model, path)
        with open(path, "rb") as f:
            return f.read()

    engine_seeds = {
        "engine float32 bidirectional": saved(gru_fast.GRU(
            [random_onnx_weights(rng, 2, 3, 4)], direction="bidirectional",
            activations=["HardSigmoid", "Tanh", "Sigmoid", "Elu"], activation_alpha=[0.3, 0.5], clip=4.0,
            provenance={"framework": "test", "tags": [1, 2]}), "a.npz"),
        "engine float64 no bias": saved(gru_fast.GRU(
            [random_onnx_weights(rng, 1, 2, 3, bias=False, dtype=np.float64),
             random_onnx_weights(rng, 1, 3, 3, bias=False, dtype=np.float64)],
            linear_before_reset=False), "b.npz"),
    }
    torch.manual_seed(0)
    state_dict = torch.nn.GRU(3, 4, num_layers=2).state_dict()
    torch.save(state_dict, os.path.join(WORK, "sd.pt"))
    np.savez(os.path.join(WORK, "sd.npz"), **{k: v.numpy() for k, v in state_dict.items()})
    torch_seeds = {}
    for name in ("sd.pt", "sd.npz"):
        with open(os.path.join(WORK, name), "rb") as f:
            torch_seeds["torch " + name] = f.read()

    X = rng.standard_normal((5, 2, 3)).astype(np.float32)

    def independent_read(path):
        # zipfile + numpy's .npy reader, member by member (np.load(path) would take a zip with bytes
        # prepended, which zipfile accepts, for a pickle)
        import zipfile
        members = {}
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.endswith(".npy"):
                    with archive.open(info) as member:
                        members[info.filename[:-4]] = np.lib.format.read_array(member, allow_pickle=False)
        return members, json.loads(members["config"].tobytes().decode())

    def check_engine(path, model):
        # the loaded model must be what the file says, and compute what the authorities compute
        members, config = independent_read(path)
        layers = model.onnx_weights()
        for l, (W, R, Bias) in enumerate(layers):
            for key, arr in (("W", W), ("R", R), ("B", Bias)):
                stored = members.get(f"layer{l}.{key}")
                if (arr is None) != (key == "B" and not config["has_bias"]):
                    return f"layer{l}.{key}: presence differs from the file"
                if arr is not None and not np.array_equal(arr, stored.astype(model.dtype)):
                    return f"layer{l}.{key}: weights differ from the file"
        for key in ("direction", "linear_before_reset", "batch_first", "clip", "provenance"):
            want = float(config[key]) if key == "clip" and config[key] is not None else config[key]
            if getattr(model, key) != want:
                return f"{key}: {getattr(model, key)!r} != file's {config[key]!r}"
        if model.dtype.name != config["dtype"] or model.num_layers != config["num_layers"]:
            return "dtype or num_layers differ from the file"
        x = X[..., : model.input_size] if model.input_size <= 3 else None
        if x is None or model.num_layers != 1 and model.dtype == np.float32:
            return None
        x = np.ascontiguousarray(x.transpose(1, 0, 2) if model.batch_first else x, dtype=model.dtype)
        y, h_n = model(x)
        x_tb = x.transpose(1, 0, 2) if model.batch_first else x
        names = [a.name for a in model.activations]  # alpha / beta lists are consumed in order by the
        alphas = [a.alpha for a in model.activations if a.takes_alpha]  # activations that take them
        betas = [a.beta for a in model.activations if a.takes_beta]
        if model.dtype == np.float32:
            W, R, Bias = layers[0]
            want_y, want_h = run_onnxruntime(x_tb, W, R, Bias, direction=model.direction,
                                             linear_before_reset=int(model.linear_before_reset),
                                             activations=names, activation_alpha=alphas,
                                             activation_beta=betas, clip=model.clip)
            tol = 1e-5
        else:
            want_y, want_h = gru_equations(x_tb, layers, direction=model.direction,
                                           linear_before_reset=model.linear_before_reset, activations=names,
                                           activation_alpha=alphas, activation_beta=betas, clip=model.clip)
            tol = 1e-10
        if model.batch_first:
            want_y = want_y.transpose(1, 0, 2)
        return close(y, want_y, 1e-5, tol) or close(h_n, want_h, 1e-5, tol)

    def check_torch(path, model):
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                sd = {k: torch.from_numpy(archive[k]) for k in archive.files}
        else:
            sd = torch.load(path, weights_only=True, map_location="cpu")
        module = torch.nn.GRU(model.input_size, model.hidden_size, num_layers=model.num_layers)
        module.load_state_dict(sd)
        with torch.no_grad():
            want_y, want_h = module(torch.from_numpy(X[..., : model.input_size].copy()))
        y, h_n = model(X[..., : model.input_size])
        return close(y, want_y.numpy()) or close(h_n, want_h.numpy())

    JSON_VALUES = [None, True, False, 0, 1, -1, 2, 1024, 10**30, 1e308, 0.5, -2.5, "", "forward", "float64",
                   "reverse", "bidirectional", "Relu", "false", [], [1], ["Tanh", "Sigmoid"], [0.5, "x"], {},
                   {"a": [1, {"b": None}]}, [[[[]]]], "\\u0000", "float16"]

    def config_mutation(seed, r):
        # a config value replaced by a random JSON value, the rest of the file intact (well-formed zip)
        buffer = io.BytesIO(seed)
        with np.load(buffer, allow_pickle=False) as archive:
            members = {k: archive[k] for k in archive.files}
        config = json.loads(members["config"].tobytes().decode())
        for _ in range(r.integers(1, 3)):
            key = sorted(config)[r.integers(0, len(config))]
            config[key] = JSON_VALUES[r.integers(0, len(JSON_VALUES))]
        members["config"] = np.frombuffer(json.dumps(config).encode(), dtype=np.uint8)
        out = io.BytesIO()
        np.savez(out, **members)
        return out.getvalue(), "config value"

    import io

    report = {"unexpected": [], "mismatches": [], "stats": {}}
    # warm-up: the unmutated seeds load and pass their own checks (the harness works)
    for name, seed in {**engine_seeds, **torch_seeds}.items():
        path = os.path.join(WORK, "seed" + (".pt" if name.endswith(".pt") else ".npz"))
        with open(path, "wb") as f:
            f.write(seed)
        if name.startswith("engine"):
            report.setdefault("seed_checks", {})[name] = check_engine(path, gru_fast.load(path)) or "ok"
        else:
            report.setdefault("seed_checks", {})[name] = check_torch(path, from_torch.load(path)) or "ok"
    limit_address_space()
    rss0 = peak_rss()
    plans = [(name, seed, "bytes", CASES["engine"]) for name, seed in engine_seeds.items()]
    plans += [(name, seed, "config", CASES["engine_config"]) for name, seed in engine_seeds.items()]
    plans += [(name, seed, "bytes", CASES["torch"]) for name, seed in torch_seeds.items()]
    for plan_index, (name, seed, kind, count) in enumerate(plans):
        label = f"{name} ({kind} mutations)"
        s = report["stats"][label] = {"cases": 0, "refused": 0, "loaded_and_checked": 0}
        path = os.path.join(WORK, "mutated" + (".pt" if name.endswith(".pt") else ".npz"))
        for case in range(count):
            r = np.random.default_rng([plan_index, case])
            data, how = config_mutation(seed, r) if kind == "config" else mutate(seed, r)
            with open(path, "wb") as f:
                f.write(data)
            s["cases"] += 1
            try:
                if name.startswith("engine"):
                    model = gru_fast.load(path, max_bytes=CAP)
                else:
                    model = from_torch.load(path, max_bytes=CAP)
            except ValueError:
                s["refused"] += 1
                continue
            except BaseException as exc:
                report["unexpected"].append([label, case, how, f"{type(exc).__name__}: {exc}"[:300]])
                continue
            try:
                problem = check_engine(path, model) if name.startswith("engine") else check_torch(path, model)
            except Exception as exc:
                problem = f"the authority could not read what the loader accepted: {type(exc).__name__}: {exc}"
            if problem:
                report["mismatches"].append([label, case, how, problem[:300]])
            else:
                s["loaded_and_checked"] += 1
    report["peak_rss_growth"] = peak_rss() - rss0
    print(json.dumps(report))
    """
)


def _child_report(code, timeout=600):
    return last_json_line(run_python(code.replace("sys.argv[1]", repr(json.dumps(CASES))), timeout=timeout))


@pytest.fixture(scope="module")
def onnx_report():
    return _child_report(ONNX_CHILD)


@pytest.fixture(scope="module")
def engine_report():
    return _child_report(ENGINE_CHILD)


def _print_stats(title, report):
    print(f"\n{title}: peak RSS growth {report['peak_rss_growth']} bytes")
    for label, s in report["stats"].items():
        print(f"  {label}: {s}")


def test_mutated_onnx_models_refused_or_equal_to_onnxruntime(onnx_report):
    _print_stats("mutated ONNX", onnx_report)
    assert all(v == "matched" for v in onnx_report["seeds"].values()), onnx_report["seeds"]
    assert onnx_report["unexpected"] == [], onnx_report["unexpected"][:10]
    assert onnx_report["mismatches"] == [], onnx_report["mismatches"][:10]
    for label, s in onnx_report["stats"].items():
        assert s["cases"] == CASES["onnx"]
        assert s["refused"] >= CASES["onnx"] // 4 and s["matched"] >= CASES["onnx"] // 10, (label, s)
    assert onnx_report["peak_rss_growth"] < 256 << 20


def test_mutated_engine_and_torch_files_refused_or_faithful(engine_report):
    _print_stats("mutated engine / PyTorch files", engine_report)
    assert all(v == "ok" for v in engine_report["seed_checks"].values()), engine_report["seed_checks"]
    assert engine_report["unexpected"] == [], engine_report["unexpected"][:10]
    assert engine_report["mismatches"] == [], engine_report["mismatches"][:10]
    for label, s in engine_report["stats"].items():
        assert s["refused"] >= s["cases"] // 4, (label, s)
        assert s["loaded_and_checked"] >= 10, (label, s)
    assert engine_report["peak_rss_growth"] < 256 << 20


# --------------------------------------------------------------------------------------------------
# crafted headers: sizes claimed, not present
# --------------------------------------------------------------------------------------------------

CRAFTED_CHILD = COMMON + textwrap.dedent(
    """
    import io
    import struct
    import zipfile

    import torch

    import gru_fast
    from conftest import random_onnx_weights
    from converters import from_torch

    CLAIM = 1_200_000_000  # bytes a header claims; the files hold a few KB

    def npy_bytes(array=None, header_shape=None, descr="<f4"):
        if array is not None:
            b = io.BytesIO()
            np.save(b, array)
            return b.getvalue()
        b = io.BytesIO()
        np.lib.format.write_array_header_1_0(b, {"descr": descr, "fortran_order": False, "shape": header_shape})
        return b.getvalue() + bytes(64)

    def zip_of(members):
        b = io.BytesIO()
        with zipfile.ZipFile(b, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
        return b.getvalue()

    def patch_zip_sizes(data, name, size):
        # rewrite a member's sizes in its local header and in the central directory
        data = bytearray(data)
        for sig, name_len_at, name_at, sizes_at in ((b"PK\\x03\\x04", 26, 30, 18), (b"PK\\x01\\x02", 28, 46, 20)):
            pos = 0
            while (pos := data.find(sig, pos)) >= 0:
                nlen = struct.unpack_from("<H", data, pos + name_len_at)[0]
                if data[pos + name_at : pos + name_at + nlen] == name.encode():
                    struct.pack_into("<II", data, pos + sizes_at, size, size)
                pos += 4
        return bytes(data)

    rng = np.random.default_rng(0)
    model = gru_fast.GRU([random_onnx_weights(rng, 1, 3, 4)])
    path = os.path.join(WORK, "m.npz")
    gru_fast.save(model, path)
    with np.load(path) as archive:
        good = {k + ".npy": npy_bytes(archive[k]) for k in archive.files}
    huge_shape = (1, 12, CLAIM // 48)

    files = {}
    files["engine: .npy header claims 1.2 GB"] = ("engine", zip_of({**good, "layer0.W.npy": npy_bytes(header_shape=huge_shape)}))
    files["engine: .npy header and zip sizes claim 1.2 GB"] = ("engine", patch_zip_sizes(
        zip_of({**good, "layer0.W.npy": npy_bytes(header_shape=huge_shape)}), "layer0.W.npy", CLAIM + 128))
    files["engine: config member claims 1.2 GB"] = ("engine", patch_zip_sizes(zip_of(good), "config.npy", CLAIM))
    files["engine: negative dimension"] = ("engine", zip_of({**good, "layer0.W.npy": npy_bytes(header_shape=(-1, 12, 3))}))
    files["engine: config nested 100,000 deep"] = ("engine", zip_of({**good, "config.npy": npy_bytes(
        np.frombuffer(b"[" * 100_000 + b"]" * 100_000, np.uint8))}))
    files["engine: 1024 layers declared, members missing"] = ("engine", zip_of({**good, "config.npy": npy_bytes(
        np.frombuffer(json.dumps(dict(json.loads(np.load(path)["config"].tobytes()), num_layers=1024)).encode(),
                      np.uint8))}))
    sd = torch.nn.GRU(3, 4).state_dict()
    sd_members = {k + ".npy": npy_bytes(v.numpy()) for k, v in sd.items()}
    files["torch .npz: .npy header claims 1.2 GB"] = ("torch.npz", zip_of(
        {**sd_members, "weight_ih_l0.npy": npy_bytes(header_shape=(CLAIM // 4,))}))
    files["torch .npz: zip sizes claim 1.2 GB"] = ("torch.npz", patch_zip_sizes(zip_of(sd_members), "weight_ih_l0.npy", CLAIM))
    pt = os.path.join(WORK, "sd.pt")
    torch.save(sd, pt)
    with open(pt, "rb") as f:
        pt_data = f.read()
    with zipfile.ZipFile(pt) as z:
        record = next(n for n in z.namelist() if "/data/" in n)
    files["torch .pt: a storage record claims 1.2 GB"] = ("torch.pt", patch_zip_sizes(pt_data, record, CLAIM))

    limit_address_space(512 << 20)
    rss0 = peak_rss()
    results = {}
    for label, (kind, data) in files.items():
        target = os.path.join(WORK, "crafted" + (".pt" if kind == "torch.pt" else ".npz"))
        with open(target, "wb") as f:
            f.write(data)
        try:
            if kind == "engine":
                gru_fast.load(target)  # default cap, 2 GiB: only the real sizes can refuse these
            else:
                from_torch.load(target)
            results[label] = ["loaded", len(data)]
        except ValueError as exc:
            results[label] = ["ValueError", len(data), str(exc)[:200]]
        except BaseException as exc:
            results[label] = [type(exc).__name__, len(data), str(exc)[:200]]
    print(json.dumps({"results": results, "peak_rss_growth": peak_rss() - rss0}))
    """
)


def test_crafted_size_claims_refused_before_allocating():
    """Files of a few KB whose headers claim 1.2 GB (the .npy shape, the zip's sizes, a torch record) are
    refused with ValueError at the default 2 GiB cap, in a process that cannot grow by 512 MiB (an attempt
    to allocate the claim would raise MemoryError); peak RSS stays flat."""
    out = _child_report(CRAFTED_CHILD, timeout=300)
    print(f"\ncrafted files: peak RSS growth {out['peak_rss_growth']} bytes")
    for label, result in out["results"].items():
        print(f"  {label}: {result}")
        assert result[0] == "ValueError", (label, result)
    assert len(out["results"]) == 9
    assert out["peak_rss_growth"] < 64 << 20


# --------------------------------------------------------------------------------------------------
# pickle payloads in engine files
# --------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this object creates ``marker`` (builtins.open(marker, "w"))."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _engine_members(tmp_path):
    model = gru_fast.GRU([random_onnx_weights(np.random.default_rng(0), 1, 3, 4)])
    path = tmp_path / "good.npz"
    gru_fast.save(model, path)
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


@pytest.mark.parametrize("where", ["config", "layer0.W", "extra member"])
def test_pickle_payload_in_engine_file_never_runs(tmp_path, where):
    """An engine .npz whose member is a pickled object array that would create a file when unpickled:
    gru_fast.load refuses it (or ignores the extra member) and the marker never appears.  Control: the
    same file read with np.load(allow_pickle=True) does run the payload."""
    marker = tmp_path / "payload_ran"
    members = _engine_members(tmp_path)
    key = "extra" if where == "extra member" else where
    members[key] = np.array([_Payload(marker), 1.0], dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **members)  # np.savez pickles object arrays
    if where == "extra member":
        loaded = gru_fast.load(path)  # the format never reads a member it does not name
        assert isinstance(loaded, gru_fast.GRU)
    else:
        with pytest.raises(ValueError, match="dtype object|object"):
            gru_fast.load(path)
    assert not marker.exists(), "the pickled payload ran"

    with np.load(path, allow_pickle=True) as archive:
        archive[key]  # control: unpickling runs the payload
    assert marker.exists()


def test_pickle_payload_as_whole_file_refused(tmp_path):
    """A .npz that is really a bare pickle (np.load would unpickle it with allow_pickle=True)."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError):
        gru_fast.load(path)
    assert not marker.exists()
    with pytest.raises(ValueError):
        from converters import from_torch
        from_torch.load(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes()).close()  # control
    assert marker.exists()


def test_zip_member_names_never_become_paths(tmp_path):
    """A member named like a path outside the directory is only a name: loading reads nothing from disk
    outside the archive, and writes nothing."""
    members = _engine_members(tmp_path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for key, value in members.items():
            b = io.BytesIO()
            np.save(b, value)
            archive.writestr(key + ".npy", b.getvalue())
        archive.writestr("../../escape.npy", b"x")
        archive.writestr("/abs/escape.npy", b"x")
    path = tmp_path / "names.npz"
    path.write_bytes(buffer.getvalue())
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    assert isinstance(gru_fast.load(path), gru_fast.GRU)
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before
