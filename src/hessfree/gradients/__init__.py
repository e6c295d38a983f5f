"""Per-example gradient engines and parameter selection."""

from .functional import flat_per_example_grads, flatten, per_example_gradients, per_example_grads
from .selection import ParamSpec, modules_in_call_order, select_parameters

__all__ = [
    "ParamSpec",
    "flat_per_example_grads",
    "flatten",
    "modules_in_call_order",
    "per_example_gradients",
    "per_example_grads",
    "select_parameters",
]
