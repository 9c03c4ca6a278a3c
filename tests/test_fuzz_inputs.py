"""Property-based fuzzing of every argument a caller hands the engine, against PyTorch.

Targets: ``model(x, h0, lengths, out)`` on two models (2-layer unidirectional, and bidirectional with
batch_first) and ``stream.step(x_t, out)`` / ``stream.reset(h0)`` programs on batched, one-row and unbatched
streams.  Hypothesis draws each argument as a valid value or a broken one: ranks 0 to 4, sizes including 0,
dtypes float16/32/64, int, uint, bool, complex, object and str, nested lists, python scalars, CPU torch
tensors, NaN and +-Inf values at random places, large magnitudes, Fortran order, negative-stride and strided
views, unaligned views, read-only arrays, and ``out`` buffers of wrong type, dtype, shape, layout,
writeability, or overlapping an input or each other.

The contract checked on every case (tests/test_bad_input.py holds the hand-written examples):

* an independent oracle, written from the API documentation, predicts whether the call is valid;
* a valid call returns what ``torch.nn.GRU`` returns for the same weights (``converters.from_torch``) and
  the same input cast to float32, within 1e-5 absolute plus 1e-6 relative (values far above 1 only arise
  from huge h0 passed through z * h), NaN where PyTorch has NaN and the same infinities; with ``lengths``,
  PyTorch runs each sequence cut to its length (PackedSequence semantics: y is 0 at padded steps, h_n is
  h0 for a length of 0);
* an invalid call raises ValueError or TypeError (the class the oracle predicts for one of the violated
  arguments) whose message names that argument, and leaves ``out`` buffers and a stream's state as they
  were;
* no input is ever modified (compared with copies, NaN positions included), on success or refusal.

Decisions the oracle encodes: x with T = 0 or B = 0 is refused with ValueError (PyTorch also refuses
T = 0; it returns an empty result for B = 0, which the engine treats as a caller's bug); float16 and float64
inputs are cast to the model's float32; integer, bool, complex, object and string data are TypeError;
float lengths are accepted when whole and finite.

The fuzz runs in a child process (a segfault or abort fails the test, a hang hits the timeout) with a fixed
budget: ``derandomize=True`` so CI replays the same cases; the number of cases tried per target is printed
and asserted.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from conftest import last_json_line, run_python

BUDGET = {"model_call": 4000, "stream_program": 600}

CHILD = textwrap.dedent(
    r"""
    import json
    import re
    import sys
    import warnings

    import numpy as np
    import torch
    from hypothesis import HealthCheck, given, settings, strategies as st

    from converters.from_torch import convert

    warnings.simplefilter("ignore", RuntimeWarning)  # overflow when huge float64 values are cast to float32
    torch.set_num_threads(1)
    BUDGET = json.loads(sys.argv[1])
    ATOL, RTOL = 1e-5, 1e-6
    I, H = 3, 4

    torch.manual_seed(0)
    TORCH = {
        "uni": torch.nn.GRU(I, H, num_layers=2).eval(),
        "bi_bf": torch.nn.GRU(I, H, num_layers=1, bidirectional=True, batch_first=True).eval(),
    }
    MODELS = {k: convert(m) for k, m in TORCH.items()}
    stats = {"model_call": {"cases": 0, "ok": 0, "ValueError": 0, "TypeError": 0, "nonfinite_compared": 0,
                            "views": 0, "read_only": 0, "zero_sized": 0},
             "stream_program": {"cases": 0, "steps_ok": 0, "steps_refused": 0, "resets_ok": 0,
                                "resets_refused": 0, "nonfinite_compared": 0}}

    # ------------------------------------------------------------------------------------------------
    # drawing arrays, valid or broken
    # ------------------------------------------------------------------------------------------------

    FLOATS = ["float32", "float64", "float16"]
    BAD_DTYPES = ["int32", "int64", "uint8", "bool", "complex64", "complex128", "object", "str"]

    def values(draw, shape, dtype):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        scale = draw(st.sampled_from([1.0, 1.0, 1.0, 10.0, 1e30]))
        data = np.asarray(rng.standard_normal(shape) * scale, dtype=np.float64)
        if draw(st.integers(0, 5)) == 0 and data.size:  # NaN / +-Inf at random places
            k = draw(st.integers(1, max(1, data.size // 3)))
            idx = rng.integers(0, data.size, k)
            data.flat[idx] = rng.choice([np.nan, np.inf, -np.inf], k)
        if dtype == "str":
            return np.asarray(data.astype(str))
        if dtype == "object":
            return np.asarray(data.astype(object))
        if dtype == "bool":
            return np.asarray(data > 0)
        if dtype.startswith("int") or dtype.startswith("uint"):
            return np.asarray(np.nan_to_num(data, nan=0.0, posinf=7, neginf=-7).clip(-100, 100).astype(dtype))
        return np.asarray(data.astype(dtype))

    def layout(draw, arr, stats_key=None):
        # the same values, in another memory layout; never changes what the array holds
        kind = draw(st.sampled_from(["c", "c", "c", "fortran", "reversed", "strided", "unaligned"]))
        if arr.ndim == 0 or arr.dtype.kind in "OU":
            kind = "c"
        if kind == "fortran":
            out = np.asfortranarray(arr)
        elif kind == "reversed":
            axis = draw(st.integers(0, arr.ndim - 1))
            flipped = np.flip(arr, axis).copy()
            out = np.flip(flipped, axis)  # negative stride on `axis`, same values
        elif kind == "strided":
            axis = draw(st.integers(0, arr.ndim - 1))
            shape = list(arr.shape)
            shape[axis] *= 2
            big = np.zeros(shape, arr.dtype)
            index = [slice(None)] * arr.ndim
            index[axis] = slice(None, None, 2)
            big[tuple(index)] = arr
            out = big[tuple(index)]
        elif kind == "unaligned" and arr.dtype.itemsize > 1:
            raw = np.zeros(arr.nbytes + 1, np.uint8)
            out = raw[1:].view(arr.dtype).reshape(arr.shape)
            out[...] = arr
        else:
            out = arr
        if out is not arr and stats_key:
            stats["model_call"]["views"] += 1
        if draw(st.integers(0, 4)) == 0:
            out = out.view()
            out.flags.writeable = False
            if stats_key:
                stats["model_call"]["read_only"] += 1
        return out

    def container(draw, arr):
        kind = draw(st.sampled_from(["array"] * 8 + ["list", "tensor"]))
        if kind == "list":
            return arr.tolist()
        if kind == "tensor" and arr.dtype.kind == "f" and arr.dtype.itemsize >= 2:
            return torch.from_numpy(arr.copy())  # torch refuses negative strides; the copy keeps the values
        return arr

    def shape_near(draw, valid, allow_rank_change=True):
        # the valid shape most of the time; otherwise one dimension changed, or another rank
        choice = draw(st.integers(0, 9))
        if choice < 6:
            return tuple(valid)
        if choice < 8 or not allow_rank_change:
            shape = list(valid)
            if shape:
                shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 6))
            return tuple(shape)
        return tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))

    def array_arg(draw, valid_shape, *, float_ok=True, key=None):
        if draw(st.integers(0, 11)) == 0:  # not an array at all
            return draw(st.sampled_from([1.5, 2, True, "x", b"x", {"a": 1}, [1.0, [2.0]], object()]))
        dtype = draw(st.sampled_from(FLOATS * 5 + BAD_DTYPES)) if float_ok else None
        shape = shape_near(draw, valid_shape)
        arr = values(draw, shape, dtype)
        return container(draw, layout(draw, arr, key))

    # ------------------------------------------------------------------------------------------------
    # the oracle: the documented contract, written independently of the engine
    # ------------------------------------------------------------------------------------------------

    class Invalid(Exception):
        def __init__(self, kind, arg):
            super().__init__(arg)
            self.kind, self.arg = kind, arg

    def as_probe(value):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = np.asarray(value)
        except (ValueError, TypeError):
            return None
        return arr

    def check_float(value, arg):
        arr = as_probe(value)
        if arr is None or arr.dtype.kind != "f":
            raise Invalid(TypeError, arg)
        return arr

    def expected_call(model, x, h0, lengths, out):
        # -> (None, info) when valid, else the list of (exception class, argument) violated
        violations = []
        try:
            xa = check_float(x, "x")
            if xa.ndim not in (2, 3) or xa.shape[-1] != model.input_size:
                raise Invalid(ValueError, "x")
            unbatched = xa.ndim == 2
            if unbatched:
                T, B = xa.shape[0], 1
            else:
                B, T = (xa.shape[0], xa.shape[1]) if model.batch_first else (xa.shape[1], xa.shape[0])
            if T == 0:  # as PyTorch: no steps is refused, no sequences (B == 0) gives empty outputs
                raise Invalid(ValueError, "x")
        except Invalid as exc:
            return [(exc.kind, exc.arg)], None
        LD, Hd = model.num_layers * model.num_directions, model.hidden_size
        state_shape = (LD, Hd) if unbatched else (LD, B, Hd)
        y_shape = xa.shape[:-1] + (model.num_directions * Hd,)
        h0a = la = None
        if h0 is not None:
            try:
                h0a = check_float(h0, "h0")
                if h0a.shape != state_shape:
                    raise Invalid(ValueError, "h0")
            except Invalid as exc:
                violations.append((exc.kind, exc.arg))
        if lengths is not None:
            la = as_probe(lengths)
            if la is None or la.dtype.kind not in "iuf":
                violations.append((TypeError, "lengths"))
            else:
                lv = la.reshape(1) if (unbatched and la.ndim == 0) else la
                if lv.shape != (B,):
                    violations.append((ValueError, "lengths"))
                elif lv.dtype.kind == "f" and not (np.all(np.isfinite(lv)) and np.all(lv == np.round(lv))):
                    violations.append((ValueError, "lengths"))
                elif lv.size and (lv.min() < 0 or lv.max() > T):
                    violations.append((ValueError, "lengths"))
                else:
                    la = lv.astype(np.int64)
        if out is not None:
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                violations.append((TypeError, "out"))
            else:
                for buf, shape in zip(out, (y_shape, state_shape)):
                    if type(buf) is not np.ndarray or buf.dtype != np.float32:
                        violations.append((TypeError, "out"))
                    elif (buf.shape != shape or not buf.flags.c_contiguous or not buf.flags.aligned
                          or not buf.flags.writeable):
                        violations.append((ValueError, "out"))
                if not violations:
                    inputs = [a for a in (x, h0, lengths) if isinstance(a, np.ndarray)]
                    if (np.may_share_memory(out[0], out[1])
                            or any(np.may_share_memory(o, a) for o in out for a in inputs)):
                        violations.append((ValueError, "out"))
        if violations:
            return violations, None
        return None, dict(x=xa.astype(np.float32), h0=None if h0a is None else h0a.astype(np.float32),
                          lengths=la, unbatched=unbatched, T=T, B=B, y_shape=y_shape, state_shape=state_shape)

    # ------------------------------------------------------------------------------------------------
    # the authority: torch.nn.GRU, sequence by sequence when lengths are given
    # ------------------------------------------------------------------------------------------------

    def torch_run(module, x, h0):
        with torch.no_grad():
            y, h = module(torch.from_numpy(np.ascontiguousarray(x)),
                          None if h0 is None else torch.from_numpy(np.ascontiguousarray(h0)))
        return y.numpy(), h.numpy()

    def authority(key, info):
        module, m = TORCH[key], MODELS[key]
        x, h0, lengths = info["x"], info["h0"], info["lengths"]
        if lengths is None:
            return torch_run(module, x, h0)
        if info["unbatched"]:
            x, h0 = (x[None], None if h0 is None else h0[:, None]) if m.batch_first else \
                    (x[:, None], None if h0 is None else h0[:, None])
        LD = m.num_layers * m.num_directions
        h0 = np.zeros((LD, info["B"], m.hidden_size), np.float32) if h0 is None else h0
        y = np.zeros((info["B"], info["T"], m.num_directions * m.hidden_size) if m.batch_first else
                     (info["T"], info["B"], m.num_directions * m.hidden_size), np.float32)
        h_n = h0.copy()
        for b, n in enumerate(lengths):
            if n == 0:
                continue  # PackedSequence: nothing runs, h_n keeps h0, y stays 0
            seq = x[b, :n] if m.batch_first else x[:n, b]
            y_b, h_b = torch_run(module, seq, h0[:, b])  # unbatched (n, I) call
            if m.batch_first:
                y[b, :n] = y_b
            else:
                y[:n, b] = y_b
            h_n[:, b] = h_b
        if info["unbatched"]:
            y, h_n = (y[0] if m.batch_first else y[:, 0]), h_n[:, 0]
        return y, h_n

    def assert_close(got, want, what):
        assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
        assert got.dtype == np.float32, f"{what}: dtype {got.dtype}"
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=what)
        return not np.all(np.isfinite(want))

    def snapshot(*args):
        out = []
        for a in args:
            if isinstance(a, torch.Tensor):
                a = a.numpy()
            out.append((a, a.copy()) if isinstance(a, np.ndarray) else (a, None))
        return out

    def assert_unchanged(snap, what):
        for original, copy in snap:
            if copy is None:
                continue
            if copy.dtype.kind == "O":  # the same objects in the same places
                same = original.shape == copy.shape and all(p is q for p, q in zip(original.flat, copy.flat))
            else:
                same = (np.array_equal(original, copy, equal_nan=True) if copy.dtype.kind in "fc"
                        else np.array_equal(original, copy))
            assert same, f"{what}: an input was modified"

    def assert_refusal(exc, violations, what):
        kinds = {k for k, _ in violations}
        assert type(exc) in kinds, f"{what}: raised {type(exc).__name__}({exc}), expected one of {kinds} for {violations}"
        args = {a for _, a in violations}
        message = str(exc)
        assert any(re.search(r"(?<![A-Za-z_])" + re.escape(a) + r"(?![A-Za-z_])", message) for a in args), \
            f"{what}: message {message!r} names none of {args}"

    # ------------------------------------------------------------------------------------------------
    # target 1: model(x, h0, lengths, out)
    # ------------------------------------------------------------------------------------------------

    @st.composite
    def call_args(draw):
        key = draw(st.sampled_from(sorted(MODELS)))
        m = MODELS[key]
        T, B = draw(st.integers(0, 6)), draw(st.integers(0, 5))
        if draw(st.integers(0, 6)) == 0:
            T, B = max(T, 1), max(B, 1)
        unbatched = draw(st.integers(0, 4)) == 0
        LD, DH = m.num_layers * m.num_directions, m.num_directions * m.hidden_size
        x_shape = (T, I) if unbatched else ((B, T, I) if m.batch_first else (T, B, I))
        state = (LD, H) if unbatched else (LD, B, H)
        x = array_arg(draw, x_shape, key="x")
        h0 = array_arg(draw, state) if draw(st.booleans()) else None
        lengths = None
        if draw(st.booleans()):
            choice = draw(st.integers(0, 9))
            n = 1 if unbatched else B
            if choice < 6:
                lengths = np.array(draw(st.lists(st.integers(0, max(T, 0)), min_size=n, max_size=n)),
                                   dtype=draw(st.sampled_from(["int64", "int32", "uint8", "float64", "int16"])))
                if unbatched and draw(st.booleans()):
                    lengths = lengths.reshape(()) if lengths.size == 1 else lengths
                lengths = container(draw, layout(draw, lengths))
            elif choice < 8:
                lengths = array_arg(draw, (n,))
            else:
                lengths = draw(st.sampled_from([[T + 1] * n, [-1] * n, [0.5] * n, [np.nan] * n, [True] * n,
                                                "3", 2, [[1]], None]))
        out = None
        if draw(st.integers(0, 2)) == 0:
            y_shape = ((B, T, DH) if m.batch_first else (T, B, DH)) if not unbatched else (T, DH)
            choice = draw(st.integers(0, 9))
            if choice < 5:
                out = (np.full(y_shape, 7.0, np.float32), np.full(state, 7.0, np.float32))
            elif choice < 7:
                buffers = [np.full(s, 7.0, np.float32) for s in (shape_near(draw, y_shape, False),
                                                                   shape_near(draw, state, False))]
                which = draw(st.integers(0, 1))
                mutation = draw(st.sampled_from(["dtype", "fortran", "strided", "readonly", "list", "none"]))
                b = buffers[which]
                if mutation == "dtype":
                    b = b.astype(draw(st.sampled_from(["float64", "float16", "int32", "complex64"])))
                elif mutation == "fortran" and b.ndim > 1:
                    b = np.asfortranarray(np.full(b.shape[::-1], 7.0, np.float32)).T.copy(order="F")
                elif mutation == "strided" and b.ndim:
                    b = np.full(b.shape[:-1] + (2 * b.shape[-1],), 7.0, np.float32)[..., ::2]
                elif mutation == "readonly":
                    b.flags.writeable = False
                elif mutation == "list":
                    b = b.tolist()
                elif mutation == "none":
                    b = None
                buffers[which] = b
                out = tuple(buffers) if draw(st.booleans()) else list(buffers)
            elif choice < 8:
                # overlapping outputs: y and h_n in one buffer, or y on top of a contiguous float32 x
                total = int(np.prod(y_shape)) + int(np.prod(state))
                buf = np.full(total + 8, 7.0, np.float32)
                y_size = int(np.prod(y_shape))
                if draw(st.booleans()):
                    start = max(y_size - 1, 0)  # h_n begins on y's last element
                    out = (buf[:y_size].reshape(y_shape), buf[start : start + int(np.prod(state))].reshape(state))
                elif isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous \
                        and x.flags.aligned and x.flags.writeable and x.size >= 1:
                    flat = x.reshape(-1)
                    view = np.lib.stride_tricks.as_strided(flat, shape=y_shape, strides=None) \
                        if flat.size >= y_size else None
                    out = (view, np.full(state, 7.0, np.float32)) if view is not None else \
                        (np.full(y_shape, 7.0, np.float32), np.full(state, 7.0, np.float32))
                else:
                    out = (np.full(y_shape, 7.0, np.float32), np.full(state, 7.0, np.float32))
            else:
                out = draw(st.sampled_from([np.zeros(3, np.float32), (np.zeros(3, np.float32),), "out", 5]))
        return key, x, h0, lengths, out

    @settings(max_examples=BUDGET["model_call"], derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(call_args())
    def fuzz_model_call(args):
        key, x, h0, lengths, out = args
        m = MODELS[key]
        s = stats["model_call"]
        s["cases"] += 1
        what = f"model[{key}](x={describe(x)}, h0={describe(h0)}, lengths={describe(lengths)}, out={describe(out)})"
        violations, info = expected_call(m, x, h0, lengths, out)
        probe = as_probe(x)
        if probe is not None and probe.ndim in (2, 3) and 0 in probe.shape[:-1]:
            s["zero_sized"] += 1
        snap = snapshot(x, h0, lengths)
        out_snap = [b.copy() for b in out] if isinstance(out, (tuple, list)) and all(
            isinstance(b, np.ndarray) for b in out) else None
        try:
            result = m(x, h0, lengths, out=out)
        except (ValueError, TypeError) as exc:
            assert violations, f"{what}: refused a valid call: {type(exc).__name__}: {exc}"
            assert_refusal(exc, violations, what)
            s[type(exc).__name__] += 1
            if out_snap is not None:
                for b, c in zip(out, out_snap):
                    assert np.array_equal(b, c, equal_nan=True) if c.dtype.kind in "fc" else np.array_equal(b, c), \
                        f"{what}: a refused call wrote into out"
        else:
            assert not violations, f"{what}: accepted an invalid call (expected {violations})"
            y, h_n = result
            if out is not None:
                assert y is out[0] and h_n is out[1], f"{what}: out buffers not returned"
            want_y, want_h = authority(key, info)
            nonfinite = assert_close(y, want_y, what + " y") | assert_close(h_n, want_h, what + " h_n")
            s["nonfinite_compared"] += int(nonfinite)
            s["ok"] += 1
        assert_unchanged(snap, what)

    def describe(a):
        if isinstance(a, np.ndarray):
            flags = "" if a.flags.c_contiguous else " non-contiguous"
            flags += "" if a.flags.writeable else " read-only"
            flags += "" if a.flags.aligned else " unaligned"
            return f"ndarray{a.shape} {a.dtype}{flags}"
        if isinstance(a, torch.Tensor):
            return f"tensor{tuple(a.shape)} {a.dtype}"
        if isinstance(a, (list, tuple)) and len(a) == 2 and not isinstance(a[0], (int, float, list)):
            return f"{type(a).__name__}({describe(a[0])}, {describe(a[1])})"
        return repr(a)[:60]

    # ------------------------------------------------------------------------------------------------
    # target 2: stream programs (step / reset), mirrored step by step in PyTorch
    # ------------------------------------------------------------------------------------------------

    STREAM_TORCH = TORCH["uni"]
    STREAM_MODEL = MODELS["uni"]
    L = STREAM_MODEL.num_layers

    @st.composite
    def stream_program(draw):
        batch_size = draw(st.sampled_from([None, 1, 2, 3]))
        B = 1 if batch_size is None else batch_size
        ops = []
        for _ in range(draw(st.integers(1, 12))):
            op = draw(st.sampled_from(["step"] * 6 + ["step_out", "reset", "reset_h0"]))
            if op.startswith("step"):
                valid = (I,) if batch_size is None else (B, I)
                if batch_size == 1 and draw(st.booleans()):
                    valid = (I,)
                x_t = array_arg(draw, valid)
                out = None
                if op == "step_out":
                    y_shape = valid[:-1] + (H,)
                    out = np.full(shape_near(draw, y_shape, False), 7.0,
                                  draw(st.sampled_from(["float32"] * 4 + ["float64"])))
                    if draw(st.integers(0, 5)) == 0:
                        out.flags.writeable = False
                ops.append(("step", x_t, out))
            elif op == "reset":
                ops.append(("reset", None, None))
            else:
                ops.append(("reset", array_arg(draw, (L, H) if batch_size is None else (L, B, H)), None))
        return batch_size, ops

    @settings(max_examples=BUDGET["stream_program"], derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(stream_program())
    def fuzz_stream(program):
        batch_size, ops = program
        s = stats["stream_program"]
        s["cases"] += 1
        B = 1 if batch_size is None else batch_size
        stream = STREAM_MODEL.stream(batch_size=batch_size)
        state = np.zeros((L, B, H), np.float32)  # the PyTorch mirror of the stream's state
        start = state.copy()  # what reset() returns to
        for index, (op, arg, out) in enumerate(ops):
            what = f"stream(batch_size={batch_size}) op {index} {op}({describe(arg)}, out={describe(out)})"
            snap = snapshot(arg)
            if op == "step":
                x_shape = (I,) if batch_size is None else (B, I)
                violations = []
                xa = None
                try:
                    xa = check_float(arg, "x_t")
                    if xa.shape != x_shape and not (B == 1 and xa.shape == (I,)):
                        raise Invalid(ValueError, "x_t")
                except Invalid as exc:
                    violations.append((exc.kind, exc.arg))
                if not violations and out is not None:
                    y_shape = xa.shape[:-1] + (H,)
                    if out.dtype != np.float32:
                        violations.append((TypeError, "out"))
                    elif out.shape != y_shape or not out.flags.writeable:
                        violations.append((ValueError, "out"))
                try:
                    y = stream.step(arg, out=out)
                except (ValueError, TypeError) as exc:
                    assert violations, f"{what}: refused a valid step: {type(exc).__name__}: {exc}"
                    assert_refusal(exc, violations, what)
                    s["steps_refused"] += 1
                else:
                    assert not violations, f"{what}: accepted an invalid step (expected {violations})"
                    x32 = xa.astype(np.float32).reshape(B, I)
                    with torch.no_grad():
                        y_t, h_t = STREAM_TORCH(torch.from_numpy(x32[None]), torch.from_numpy(state))
                    state = h_t.numpy()
                    want = y_t.numpy()[0].reshape(xa.shape[:-1] + (H,))
                    s["nonfinite_compared"] += int(assert_close(y, want, what))
                    s["steps_ok"] += 1
            else:
                violations = []
                ha = None
                if arg is not None:
                    try:
                        ha = check_float(arg, "h0")
                        if ha.shape != ((L, H) if batch_size is None else (L, B, H)):
                            raise Invalid(ValueError, "h0")
                    except Invalid as exc:
                        violations.append((exc.kind, exc.arg))
                try:
                    stream.reset(arg)
                except (ValueError, TypeError) as exc:
                    assert violations, f"{what}: refused a valid reset: {type(exc).__name__}: {exc}"
                    assert_refusal(exc, violations, what)
                    s["resets_refused"] += 1
                else:
                    assert not violations, f"{what}: accepted an invalid reset (expected {violations})"
                    if ha is not None:
                        start = ha.astype(np.float32).reshape(L, B, H)
                    state = start.copy()
                    s["resets_ok"] += 1
            assert_unchanged(snap, what)
            got = stream.state.reshape(L, B, H)
            np.testing.assert_allclose(got, state, rtol=RTOL, atol=ATOL, equal_nan=True,
                                       err_msg=what + ": state after the operation")

    fuzz_model_call()
    fuzz_stream()
    print(json.dumps(stats))
    """
)


@pytest.fixture(scope="module")
def report():
    return last_json_line(run_python(CHILD.replace("sys.argv[1]", repr(json.dumps(BUDGET))), timeout=600))


def test_model_call_fuzz(report):
    """model(x, h0, lengths, out): each case valid -> equals PyTorch, invalid -> ValueError/TypeError naming
    the argument; inputs never modified.  Both outcomes, and the special inputs, occur often."""
    s = report["model_call"]
    print(f"\nmodel(...) fuzz: {s}")
    assert s["cases"] == BUDGET["model_call"]
    assert s["ok"] >= 400 and s["ValueError"] >= 400 and s["TypeError"] >= 400, s
    assert s["nonfinite_compared"] >= 50 and s["views"] >= 400 and s["read_only"] >= 200, s
    assert s["zero_sized"] >= 100, s


def test_stream_fuzz(report):
    """stream.step / stream.reset programs: every step equals PyTorch stepping the same state; refused
    operations leave the state unchanged."""
    s = report["stream_program"]
    print(f"\nstream fuzz: {s}")
    assert s["cases"] == BUDGET["stream_program"]
    assert s["steps_ok"] >= 500 and s["steps_refused"] >= 500 and s["resets_ok"] >= 100, s
    assert s["resets_refused"] >= 50 and s["nonfinite_compared"] >= 50, s


# --------------------------------------------------------------------------------------------------
# NaN and Inf on every kernel path
# --------------------------------------------------------------------------------------------------

NONFINITE_CHILD = textwrap.dedent(
    """
    import json
    import numpy as np
    import torch
    from converters.from_torch import convert

    torch.manual_seed(0)
    torch.set_num_threads(1)  # two OpenMP pools (torch's and Numba's) on 2 cores slow PyTorch 100-fold
    results = []
    # (layers, bidirectional, I, H, T, B): serial, split by hidden units (few rows), by rows and directions
    for L, bi, I, H, T, B in [(2, False, 3, 5, 40, 2), (1, True, 16, 64, 300, 4), (2, False, 16, 64, 200, 3),
                              (1, True, 8, 32, 300, 9)]:
        module = torch.nn.GRU(I, H, num_layers=L, bidirectional=bi).eval()
        model = convert(module)
        rng = np.random.default_rng(L * 100 + H)
        base = rng.standard_normal((T, B, I)).astype(np.float32)
        patterns = {}
        x = base.copy(); x[:] = np.nan; patterns["all NaN"] = x
        x = base.copy(); x[:] = np.inf; patterns["all +Inf"] = x
        x = base.copy(); x[T // 2, 0, 0] = np.nan; patterns["one NaN mid-sequence"] = x
        x = base.copy(); x[0, -1, :] = np.inf; x[1, -1, 0] = -np.inf; patterns["Inf at the start of one row"] = x
        x = base.copy(); x[T // 3, :, 1] = -np.inf; patterns["-Inf column"] = x
        x = base.copy(); x[::7, :, 0] = 3e38; patterns["near float32 max"] = x
        for name, x in patterns.items():
            h0 = rng.standard_normal((L * (2 if bi else 1), B, H)).astype(np.float32)
            y, h_n = model(x, h0)
            with torch.no_grad():
                y_t, h_t = module(torch.from_numpy(x), torch.from_numpy(h0))
            entry = {"case": f"L={L} bi={bi} H={H} T={T} B={B}: {name}"}
            for what, got, want in (("y", y, y_t.numpy()), ("h_n", h_n, h_t.numpy())):
                entry[what + "_nan_equal"] = bool(np.array_equal(np.isnan(got), np.isnan(want)))
                entry[what + "_inf_equal"] = bool(np.array_equal(got[np.isinf(want)], want[np.isinf(want)])
                                                  and np.array_equal(np.isinf(got), np.isinf(want)))
                finite = np.isfinite(want)
                entry[what + "_err"] = float(np.max(np.abs(got[finite] - want[finite]), initial=0.0))
                entry[what + "_nan_count"] = int(np.isnan(want).sum())
            results.append(entry)
    print(json.dumps(results))
    """
)


def test_nan_and_inf_propagate_as_in_pytorch_on_every_kernel_path():
    """Authority: PyTorch.  NaN/Inf in x (everywhere, at one step, in one row, one column) on serial,
    parallel and batched kernel sizes, T up to 300: NaN exactly where PyTorch has NaN, the finite values
    within 1e-5, and no hang (the child has a timeout)."""
    results = last_json_line(run_python(NONFINITE_CHILD, env={"NUMBA_NUM_THREADS": "2"}, timeout=300))
    assert len(results) == 24
    for entry in results:
        for what in ("y", "h_n"):
            assert entry[what + "_nan_equal"], f"{entry['case']}: NaN positions of {what} differ from PyTorch"
            assert entry[what + "_inf_equal"], f"{entry['case']}: infinities of {what} differ from PyTorch"
            assert entry[what + "_err"] <= 1e-5, f"{entry['case']}: {what} error {entry[what + '_err']:.2e}"
    assert sum(e["y_nan_count"] for e in results) > 0  # the cases do produce NaN


# --------------------------------------------------------------------------------------------------
# out= overlapping an input the engine had to copy
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["x", "h0", "x_t"])
def test_out_overlapping_a_converted_input_is_refused(which):
    """API contract: outputs may not overlap inputs (ValueError), and inputs are never modified -- also when
    the input is one the engine must copy (non-contiguous), so that the copy no longer overlaps ``out``.
    (Found by this file's review: the overlap check once looked at the copies; fixed in model.py.)"""
    import gru_fast

    rng = np.random.default_rng(0)
    model = gru_fast.GRU([(rng.standard_normal((1, 12, 4)).astype(np.float32),
                           rng.standard_normal((1, 12, 4)).astype(np.float32), None)])
    base = rng.standard_normal(400).astype(np.float32)
    if which == "x":
        x = base[:120].reshape(5, 3, 8)[:, :, ::2]  # non-contiguous: the engine copies it
        args, out = (x,), (base[:60].reshape(5, 3, 4), np.empty((1, 3, 4), np.float32))
        victim = x
    elif which == "h0":
        h0 = base[:24].reshape(1, 3, 8)[:, :, ::2]
        args, out = (rng.standard_normal((5, 3, 4)).astype(np.float32), h0), \
            (np.empty((5, 3, 4), np.float32), base[:12].reshape(1, 3, 4))
        victim = h0
    else:
        x_t = base[:24].reshape(3, 8)[:, ::2]
        stream = model.stream(batch_size=3)
        victim = x_t
    before = victim.copy()
    with pytest.raises(ValueError, match="out"):
        if which == "x_t":
            stream.step(x_t, out=base[:12].reshape(3, 4))
        else:
            model(*args, out=out)
    assert np.array_equal(victim, before), "the caller's input was overwritten"
