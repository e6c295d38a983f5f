"""Which parameters influence is computed over.

``params`` on :class:`hessfree.Influence` accepts:

* ``None``: every parameter with ``requires_grad=True`` (a LoRA model with a
  frozen base therefore gives adapter gradients only);
* ``"all"``: every parameter, frozen or not;
* ``"last"``: the parameters of the last module with parameters that runs in
  the forward pass (the output layer);
* a module-name prefix or a list of them, e.g. ``"fc2"`` or ``["encoder.layer.11", "head"]``;

A tied parameter (a language model's output layer sharing the input embedding,
``lm_head.weight is transformer.wte.weight``) is one parameter: ``"last"`` and a
prefix of any of its names select it, under the name ``named_parameters()``
gives it (``transformer.wte.weight``), and its gradient has both uses, as
autograd's has.
* a callable ``(name, parameter) -> bool``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import nn

ParamSpec = Union[None, str, Sequence[str], Callable[[str, nn.Parameter], bool]]


def modules_in_call_order(module: nn.Module, run: Callable[[], Any]) -> list[str]:
    """Names of the leaf modules with parameters, in the order ``run()`` calls them."""
    order: list[str] = []
    handles = []
    for name, sub in module.named_modules():
        if next(sub.parameters(recurse=False), None) is not None:
            handles.append(sub.register_forward_hook(lambda m, i, o, name=name: order.append(name)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    seen: dict[str, None] = {}
    for name in order:
        seen.setdefault(name, None)
    return list(seen)


def _matches_prefix(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def select_parameters(
    module: nn.Module,
    spec: ParamSpec,
    call_order: Callable[[], list[str]] | None = None,
) -> list[str]:
    """Names of the selected parameters, in ``named_parameters`` order.

    Raises ``ValueError`` naming the spec and the available names when nothing
    is selected.
    """
    named = dict(module.named_parameters())
    if spec is None:
        names = [n for n, p in named.items() if p.requires_grad]
        hint = "no parameter has requires_grad=True; unfreeze some or pass params='all'"
    elif spec == "all":
        names = list(named)
        hint = "the model has no parameters"
    elif spec == "last":
        if call_order is None:
            raise ValueError("params='last' needs an example to find the output layer")
        order = call_order()
        if not order:
            raise ValueError("params='last': no module with parameters ran in the forward pass")
        last = order[-1]
        own = {id(p) for p in module.get_submodule(last).parameters(recurse=False)}  # tied ones by identity
        names = [n for n, p in named.items() if id(p) in own]
        hint = f"the last module {last!r} has no parameters"
    elif isinstance(spec, str) or (isinstance(spec, Sequence) and all(isinstance(s, str) for s in spec)):
        prefixes = [spec] if isinstance(spec, str) else list(spec)
        # every name of a tied parameter counts ("lm_head" finds a weight listed as "transformer.wte.weight")
        hit = {id(p) for n, p in module.named_parameters(remove_duplicate=False) if any(_matches_prefix(n, q) for q in prefixes)}
        names = [n for n, p in named.items() if id(p) in hit]
        hint = f"no parameter name starts with {prefixes}"
    elif callable(spec):
        names = [n for n, p in named.items() if spec(n, p)]
        hint = "the callable selected no parameter"
    else:
        raise TypeError(
            f"params={spec!r} is not understood; use None, 'all', 'last', a name prefix, "
            "a list of prefixes or a callable (name, param) -> bool"
        )
    if not names:
        shown = ", ".join(list(named)[:12]) + (" ..." if len(named) > 12 else "")
        raise ValueError(f"no parameters selected by params={spec!r}: {hint}. Parameters: [{shown}]")
    return names
