"""gru_fast: fast, exact CPU inference for GRU networks.

>>> import gru_fast
>>> model = gru_fast.load("model.npz")          # or converters.from_torch.convert(nn_gru)
>>> y, h_n = model(x, h0)                          # nn.GRU's shapes and meaning
>>> s = model.stream(batch_size=1); y_t = s.step(x_t)

See README.md for the semantics table and shared conventions.
"""

from . import _config  # noqa: F401  (threading layer and cache directory, before any kernel)
from ._cache import kernel_cache_stats
from ._compile import warmup
from .activations import ACTIVATION_NAMES, Activation
from .io import load, save
from .model import GRU, Stream

__all__ = ["GRU", "Stream", "save", "load", "Activation", "ACTIVATION_NAMES", "threading_layer", "warmup",
           "set_num_threads", "get_num_threads", "threads", "kernel_cache_stats", "__version__"]
__version__ = "0.1.0"
threading_layer = _config.threading_layer
set_num_threads = _config.set_num_threads
get_num_threads = _config.get_num_threads
threads = _config.threads
