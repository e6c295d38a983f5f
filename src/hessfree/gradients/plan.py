"""Which rule computes each selected parameter's per-example gradient.

A *unit* is one block of the feature vector. A matrix unit holds one weight
(plus its bias as an extra column when only one layer uses both) and lists every
layer that uses that tensor: a weight tied between an input embedding and an
output layer is one unit with two uses, whose per-example gradients add up, as
in autograd. The parameters of no matrix unit form one ``"dense"`` unit; their
per-example gradients come from the elementwise rules of
:mod:`hessfree.gradients.rules` (biases, norm layers) or, for parameters without
a rule, from the fallback engine (one backward pass per example).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from .rules import layer_kind, matrix_shape, trusted_affine

_SAME_LAYOUT = {"linear": "matrix", "embedding": "matrix", "transposed_linear": "transposed", "conv": "conv"}


@dataclass
class Unit:
    """One block of the projected feature vector.

    ``kind`` is the rule kind of the first layer using the weight (``"linear"``,
    ``"transposed_linear"``, ``"conv"``, ``"embedding"``) or ``"dense"``. ``rows x
    cols`` is the gradient matrix shape (the bias, if any, is an extra column);
    ``k_rows * k_cols`` numbers are kept (``k_rows = rows`` means no projection
    on that side). ``uses`` lists ``(layer name, kind)`` of every layer using the
    weight; ``module`` (the first) names the projection factors.
    """

    kind: str
    module: str
    names: list[str]
    rows: int
    cols: int
    weight: str | None = None
    bias: str | None = None
    k_rows: int = 0
    k_cols: int = 0
    uses: list[tuple[str, str]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def k(self) -> int:
        return self.k_rows * self.k_cols


@dataclass
class Plan:
    """Units, the layers whose elementwise rules fill the dense unit, and the
    parameters left to the fallback engine."""

    units: list[Unit]
    vector: dict[str, tuple[str, dict[str, str]]]  # layer -> (kind, {local name: full name})
    fallback: list[str]
    owners: dict[str, list[str]]  # full parameter name -> layers that own it
    broadcast: list[str] = field(default_factory=list)  # free parameters of leading dimension 1

    @property
    def hooked(self) -> list[str]:
        """Every layer the hook pass records."""
        layers = [m for u in self.units for m, _ in u.uses] + list(self.vector)
        return list(dict.fromkeys(layers))

    @property
    def batched(self) -> bool:
        """True when the batched pass has work (a hooked layer or a broadcast parameter)."""
        return bool(self.hooked or self.broadcast)

    @property
    def legacy(self) -> bool:
        """True when the layout equals the one of earlier versions (no tied or transposed unit)."""
        return all(len(u.uses) <= 1 and u.kind != "transposed_linear" for u in self.units)


def make_plan(
    module: nn.Module, names: list[str], dim: int | None, fallback: set[str] | frozenset = frozenset(),
    verified: set[str] | frozenset = frozenset(), free: bool = False,
) -> Plan:
    """Assign every name in ``names`` to a rule (see the module docstring).

    Args:
        dim: the projection dimension shared over the units (``None``: exact).
        fallback: parameters forced onto the fallback engine (a rule failed its check).
        verified: layers of unknown classes whose elementwise affine rule passed a
            check against a per-example loop (others of unknown class fall back).
        free: let parameters of leading dimension 1 that no layer rule covers (a
            class token, learned position embeddings added to every example) take
            the broadcast rule: each example gets its own copy of the tensor in the
            batched pass, and its gradient is that copy's. Only sound when checked
            against the loop, so off unless the caller checks.
    """
    selected = set(names)
    owners: dict[str, list[str]] = {}
    weight_uses: dict[str, list[tuple[str, str, str | None]]] = {}
    vector: dict[str, tuple[str, dict[str, str]]] = {}
    params = dict(module.named_parameters())
    canonical = {id(p): n for n, p in params.items()}
    for mname, m in module.named_modules():
        own = {local: canonical[id(p)] for local, p in m.named_parameters(recurse=False) if id(p) in canonical}
        for full in own.values():
            owners.setdefault(full, []).append(mname)
        sel = {local: full for local, full in own.items() if full in selected and full not in fallback}
        kind = layer_kind(m)
        if not sel or kind is None:
            continue
        if kind == "affine":
            if trusted_affine(m) or mname in verified:
                vector[mname] = (kind, sel)
        elif "weight" in sel:
            weight_uses.setdefault(sel["weight"], []).append((mname, kind, sel.get("bias")))
        elif "bias" in sel:
            vector[mname] = (kind, {"bias": sel["bias"]})
    units: list[Unit] = []
    subs = dict(module.named_modules())
    for w, uses in weight_uses.items():
        shapes = {(_SAME_LAYOUT[k], matrix_shape(k, subs[m])) for m, k, _ in uses}
        if len(shapes) > 1 or set(owners[w]) - {m for m, _, _ in uses}:
            continue  # shared with a layer that lays it out differently or has no rule: fallback
        mname, kind, b = uses[0]
        rows, cols = matrix_shape(kind, subs[mname])
        merge = len(uses) == 1 and b is not None and not owners_elsewhere(owners, b, mname)
        for m, k, bias in uses:
            if bias is not None and not merge:
                vector[m] = (k, {"bias": bias})
        unit_names = [n for n in names if n == w or (merge and n == b)]
        units.append(Unit(kind, mname, unit_names, rows, cols + merge, w, b if merge else None,
                          uses=[(m, k) for m, k, _ in uses]))  # fmt: skip
    covered = {n for u in units for n in u.names}
    in_vector = {full for _, (_, sel) in vector.items() for full in sel.values()}
    rest = [n for n in names if n not in covered]
    if rest:
        units.append(Unit("dense", "", rest, 1, sum(params[n].numel() for n in rest)))
    order = {n: i for i, n in enumerate(names)}
    units.sort(key=lambda u: order[u.names[0]])
    _allocate(units, dim)
    left = [n for n in rest if n not in in_vector]
    broadcast = [n for n in left if free and n not in fallback and params[n].dim() >= 1 and params[n].shape[0] == 1]
    return Plan(units, vector, [n for n in left if n not in broadcast], owners, broadcast)


def owners_elsewhere(owners: dict[str, list[str]], name: str, layer: str) -> list[str]:
    """The layers other than ``layer`` that own parameter ``name`` (a shared bias)."""
    return [m for m in owners.get(name, []) if m != layer]


def _allocate(units: list[Unit], dim: int | None) -> None:
    if dim is None:  # exact: nothing projected
        for u in units:
            u.k_rows, u.k_cols = u.rows, u.cols
        return
    left, todo = dim, sorted(units, key=lambda u: u.numel)
    if dim < len(units):
        raise ValueError(
            f"projection dim={dim} is smaller than the {len(units)} layers selected; "
            f"use dim >= {len(units)} or select fewer parameters with params=..."
        )
    for i, u in enumerate(todo):
        share = left // (len(todo) - i)
        if u.numel <= share:
            u.k_rows, u.k_cols = u.rows, u.cols
        elif u.kind == "dense":
            u.k_rows, u.k_cols = 1, share
        else:
            k_r = min(u.rows, max(1, math.isqrt(share)))
            k_c = min(u.cols, max(1, share // k_r))
            if k_c == u.cols:  # the column side is kept whole: give the rows the rest
                k_r = min(u.rows, max(1, share // k_c))
            u.k_rows, u.k_cols = k_r, k_c
        left -= u.k
