"""The ONNX RNN activation functions and their parameters.

The ONNX GRU operator names two activations per direction, ``f`` for the update
and reset gates and ``g`` for the candidate, from a fixed list.  Some take an
``alpha`` and/or ``beta``; the operator's ``activation_alpha`` and
``activation_beta`` lists are consumed in order by the activations that take
that parameter.  The spec gives no defaults for a missing value; gru_fast uses
ONNX Runtime's (onnxruntime/core/providers/cpu/rnn/rnn_helpers.cc): LeakyRelu
alpha 0.01, HardSigmoid 0.2/0.5, Elu 1.0 and 0.0 for every other parameter, so
ScaledTanh and Affine without parameters are identically 0 and
ThresholdedRelu thresholds at 0.  Converters that mean alpha=1 (Keras'
"linear") pass it explicitly.

Kernels see an activation as an integer code plus (alpha, beta); this module is
the only place that maps names to codes.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

__all__ = ["Activation", "ACTIVATION_NAMES", "parse_activations", "DEFAULT_ACTIVATIONS"]

# code, canonical name, takes alpha, takes beta, default alpha, default beta
_TABLE = (
    (0, "Sigmoid", False, False, 0.0, 0.0),
    (1, "Tanh", False, False, 0.0, 0.0),
    (2, "Relu", False, False, 0.0, 0.0),
    (3, "HardSigmoid", True, True, 0.2, 0.5),
    (4, "LeakyRelu", True, False, 0.01, 0.0),
    (5, "ThresholdedRelu", True, False, 0.0, 0.0),
    (6, "ScaledTanh", True, True, 0.0, 0.0),
    (7, "Affine", True, True, 0.0, 0.0),
    (8, "Elu", True, False, 1.0, 0.0),
    (9, "Softsign", False, False, 0.0, 0.0),
    (10, "Softplus", False, False, 0.0, 0.0),
)
_BY_LOWER = {row[1].lower(): row for row in _TABLE}

ACTIVATION_NAMES: tuple[str, ...] = tuple(row[1] for row in _TABLE)


class Activation(NamedTuple):
    """One activation slot: its ONNX name and the parameters it is evaluated with."""

    name: str
    alpha: float = 0.0
    beta: float = 0.0

    @property
    def code(self) -> int:
        """The integer the kernels dispatch on."""
        return _BY_LOWER[self.name.lower()][0]

    @property
    def takes_alpha(self) -> bool:
        return _BY_LOWER[self.name.lower()][2]

    @property
    def takes_beta(self) -> bool:
        return _BY_LOWER[self.name.lower()][3]


DEFAULT_ACTIVATIONS = (Activation("Sigmoid"), Activation("Tanh"))


def parse_activations(
    names: Sequence[str] | None,
    alphas: Sequence[float] | None,
    betas: Sequence[float] | None,
    num_directions: int,
) -> tuple[Activation, ...]:
    """Resolve ONNX ``activations``/``activation_alpha``/``activation_beta``.

    Returns ``2 * num_directions`` activations ordered ``[f, g]`` per direction
    (forward first).  Two names are shared by every direction.  Raises
    ValueError for unknown names, a wrong count, or unused parameters.
    """
    if names is None or len(names) == 0:
        if alphas or betas:
            raise ValueError("activation_alpha/activation_beta given without activations")
        return DEFAULT_ACTIVATIONS * num_directions
    if isinstance(names, str):
        raise TypeError("activations must be a sequence of names, e.g. ['Sigmoid', 'Tanh']")
    names = list(names)
    if len(names) == 2 and num_directions == 2:
        # One [f, g] pair, with its parameters, shared by both directions.
        return parse_activations(names, alphas, betas, 1) * 2
    if len(names) != 2 * num_directions:
        raise ValueError(
            f"activations: expected 2 names per direction ({2 * num_directions} in all), got {len(names)}"
        )
    alpha_queue = [float(a) for a in (alphas or ())]
    beta_queue = [float(b) for b in (betas or ())]
    resolved = []
    for name in names:
        if not isinstance(name, str) or name.lower() not in _BY_LOWER:
            raise ValueError(
                f"activations: unknown activation {name!r}; expected one of {', '.join(ACTIVATION_NAMES)}"
            )
        _, canonical, takes_alpha, takes_beta, alpha, beta = _BY_LOWER[name.lower()]
        if takes_alpha and alpha_queue:
            alpha = alpha_queue.pop(0)
        if takes_beta and beta_queue:
            beta = beta_queue.pop(0)
        resolved.append(Activation(canonical, alpha, beta))
    if alpha_queue or beta_queue:
        raise ValueError(
            f"activation_alpha/activation_beta: {len(alpha_queue)} alpha and {len(beta_queue)} beta "
            "values left over after every activation took its parameters"
        )
    return tuple(resolved)
