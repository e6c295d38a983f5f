"""Per-example gradient engines and parameter selection.

Engines (``hf.Influence(..., engine=...)``; all give the same numbers):
``"auto"`` (layer hooks on one batched pass, :mod:`.rules`, with a per-example
loop for parameters without a rule), ``"hooks"``, ``"vmap"`` (``torch.func``)
and ``"loop"`` (one backward pass per example, the reference). See
:mod:`.projected` for how they are checked against the loop.
"""

from ..params import ParamSpec, modules_in_call_order, select_parameters
from .functional import flat_per_example_grads, flatten, per_example_grads
from .model_grads import per_example_gradients
from .projected import ENGINES

__all__ = [
    "ENGINES",
    "ParamSpec",
    "flat_per_example_grads",
    "flatten",
    "modules_in_call_order",
    "per_example_gradients",
    "per_example_grads",
    "select_parameters",
]
