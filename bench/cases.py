"""The benchmark cases, their weights and inputs, and the arithmetic done per call.

Every engine of a case runs the same weights on the same inputs: the weights are drawn here once, with
numpy, in PyTorch's ``nn.GRU`` layout (gates r, z, n; ``U(-1/sqrt(H), 1/sqrt(H))`` like PyTorch's own
initialisation), and each engine is built from them (see :mod:`bench.engines`).  Nothing here imports
torch, so the harness still runs, minus the PyTorch column, where torch is not installed.

FLOP count of one call (``Case.flops``), D directions::

    flops = D * T * B * (2 * 3H * (I + H)  +  12 * H)

The first term is the two matrix products of every step (input projection ``x W^T`` and recurrent
product ``h R^T``, 2 flops per multiply-add); the second is the element-wise work per hidden unit and
step, counted as 12 operations (bias adds, ``r * (h R_n^T + b)``, one flop per sigmoid / tanh, the
update ``(1 - z) * n + z * h``).  At the sizes measured here the element-wise term is under 3% of the
total, so the GFLOP/s figure is essentially matrix-product throughput and is comparable with sgemm.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "Case", "CASES", "CASE_BY_NAME", "LATENCY_CASES", "PARITY_STEPS", "PARITY_TOLERANCE", "Problem",
    "make_problem", "make_state_dict", "reference_gru", "scaling_cases",
]

#: max abs error against the reference (PyTorch) above which an engine is flagged.
PARITY_TOLERANCE = 1e-4
#: a streaming case is checked over this many steps with the state fed back, not just one.
PARITY_STEPS = 8


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the benchmark table.

    ``stream`` cases time one step: gru_fast's ``Stream.step`` against the peers' T=1 sequence call
    with their state fed back; ``steps`` is then 1.  ``target`` is the required ratio
    best-peer median / gru_fast median; ``sgemm_target`` (a fraction) additionally requires gru_fast's
    GFLOP/s to reach that share of the machine's measured sgemm rate.
    """

    name: str
    title: str
    batch: int
    steps: int
    input_size: int
    hidden_size: int
    bidirectional: bool = False
    stream: bool = False
    target: float = 1.0
    sgemm_target: float | None = None

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def shape(self) -> str:
        text = f"B={self.batch} T={self.steps} I={self.input_size} H={self.hidden_size}"
        return text + (" bidir" if self.bidirectional else "")

    @property
    def flops(self) -> int:
        """Floating-point operations of one call (see the module docstring for the formula)."""
        B, T, I, H, D = self.batch, self.steps, self.input_size, self.hidden_size, self.num_directions
        return D * T * B * (2 * 3 * H * (I + H) + 12 * H)

    def with_shape(self, **changes) -> "Case":
        return dataclasses.replace(self, **changes)


CASES: tuple[Case, ...] = (
    Case("stream", "one streaming step (stream.step vs peers' T=1 calls)", 1, 1, 256, 256,
         stream=True, target=2.5),
    Case("tiny_bidir", "tiny model, bidirectional", 1, 3, 10, 10, bidirectional=True, target=3.0),
    Case("latency", "latency", 1, 100, 64, 256, target=1.5),
    Case("long_seq", "long sequence", 1, 1000, 40, 128, target=1.5),
    Case("bidir_latency", "bidirectional latency", 1, 100, 128, 256, bidirectional=True, target=1.8),
    Case("small_batch", "small batch", 8, 100, 128, 256, target=1.5),
    Case("throughput_64", "throughput", 64, 100, 128, 256, target=1.0),
    Case("throughput_256", "throughput, large", 256, 50, 256, 512, target=1.0, sgemm_target=0.75),
)
CASE_BY_NAME = {case.name: case for case in CASES}
#: issue 13's latency rows (B=1..8): the report shows them interleaved and each engine alone side by side
LATENCY_CASES = ("stream", "latency", "long_seq", "bidir_latency", "tiny_bidir", "small_batch")


def scaling_cases(quick: bool) -> dict[str, tuple[str, list[Case]]]:
    """Shapes for the scaling plot, one parameter varied at a time: axis -> (the fixed sizes, cases)."""
    if quick:
        ts, bs, hs = (10, 100), (1, 16), (64, 256)
    else:
        ts, bs, hs = (10, 30, 100, 300, 1000), (1, 4, 16, 64, 256), (32, 64, 128, 256, 512, 1024)
    return {
        "T": ("B=1 I=64 H=256", [Case(f"T={t}", "scaling in T", 1, t, 64, 256) for t in ts]),
        "B": ("T=50 I=128 H=256", [Case(f"B={b}", "scaling in B", b, 50, 128, 256) for b in bs]),
        "H": ("B=1 T=100 I=64", [Case(f"H={h}", "scaling in H", 1, 100, 64, h) for h in hs]),
    }


# ----------------------------------------------------------------------------------------------------
# weights and inputs
# ----------------------------------------------------------------------------------------------------

def make_state_dict(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights in ``nn.GRU.state_dict()`` layout (keys ``weight_ih_l0``, ... ``_reverse``)."""
    rng = np.random.default_rng(seed)
    H, I = case.hidden_size, case.input_size
    bound = 1.0 / np.sqrt(H)
    shapes = {"weight_ih": (3 * H, I), "weight_hh": (3 * H, H), "bias_ih": (3 * H,), "bias_hh": (3 * H,)}
    state = {}
    for suffix in ("_l0", "_l0_reverse")[: case.num_directions]:
        for name, shape in shapes.items():
            state[name + suffix] = rng.uniform(-bound, bound, shape).astype(np.float32)
    return state


@dataclasses.dataclass
class Problem:
    """What every engine of a case shares.

    ``x`` (T, B, I) and ``h0`` (D, B, H) are the timed inputs (for a stream case ``x`` is the single
    frame (1, B, I)).  ``parity_x`` is what the parity check feeds: ``x`` itself for a sequence case,
    ``PARITY_STEPS`` frames stepped one at a time for a stream case.
    """

    case: Case
    state_dict: dict[str, np.ndarray]
    x: np.ndarray
    h0: np.ndarray
    parity_x: np.ndarray


def make_problem(case: Case, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed + 1)
    B, I, H, D = case.batch, case.input_size, case.hidden_size, case.num_directions
    steps = PARITY_STEPS if case.stream else case.steps
    parity_x = rng.standard_normal((steps, B, I), dtype=np.float32)
    h0 = (0.5 * rng.standard_normal((D, B, H))).astype(np.float32)
    x = np.ascontiguousarray(parity_x[:1]) if case.stream else parity_x
    return Problem(case, make_state_dict(case, seed), x, h0, parity_x)


def reference_gru(state_dict, x, h0):
    """nn.GRU's forward pass (one layer, PyTorch layout, gates r, z, n) by :func:`gru_fast.reference.gru_equations`
    in float64: the parity reference when torch is not installed.  Returns (y (T, B, D*H), h_n (D, B, H)) as
    float32."""
    from gru_fast.reference import gru_equations

    D = 2 if "weight_ih_l0_reverse" in state_dict else 1
    W, R, B = [], [], []
    for suffix in ("_l0", "_l0_reverse")[:D]:
        w_ih, w_hh, b_ih, b_hh = (np.asarray(state_dict[k + suffix], np.float64)
                                  for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        H = w_hh.shape[1]
        zrn = lambda m: np.concatenate([m[H:2 * H], m[:H], m[2 * H:]])  # noqa: E731  (r, z, n -> z, r, n)
        W.append(zrn(w_ih))
        R.append(zrn(w_hh))
        B.append(np.concatenate([zrn(b_ih), zrn(b_hh)]))
    y, h_n = gru_equations(x, [(np.stack(W), np.stack(R), np.stack(B))],
                           direction="bidirectional" if D == 2 else "forward", h0=h0)
    return y.astype(np.float32), h_n.astype(np.float32)
