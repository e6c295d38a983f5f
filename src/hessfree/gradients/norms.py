"""Checking gradients against the per-example loop, and exact squared per-example
gradient norms from the hooks without forming the gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data import Batch, batch_size_of
from .functional import per_example_grads_loop
from .plan import Plan
from .rules import batch_major, capture, row_col, vector_grads


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of an engine's gradients against the per-example loop, by dtype."""
    return {torch.float64: 1e-6, torch.float32: 1e-3}.get(dtype, 5e-2)


def close_to(got: torch.Tensor, ref: torch.Tensor, total: torch.Tensor) -> bool:
    """Every example's gradient of one parameter within the dtype's tolerance of the
    reference: relative to its own norm, with a floor of a few hundred rounding
    errors of the example's whole gradient (``total``, ``(B,)``), so a parameter
    whose true gradient is zero (a key bias under softmax) passes on rounding noise.
    Norms in the gradients' own dtype (no fp64 copy of large gradients)."""
    tol = tolerance(ref.dtype)
    floor = 100 * torch.finfo(ref.dtype).eps * total
    b = ref.shape[0]
    err = torch.linalg.vector_norm((got.to(ref.dtype) - ref).reshape(b, -1), dim=1)
    return bool((err <= tol * torch.linalg.vector_norm(ref.reshape(b, -1), dim=1) + floor + 1e-30).all())


def gradient_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example norm of the whole gradient ``(B,)``."""
    b = next(iter(grads.values())).shape[0]
    return sum(torch.linalg.vector_norm(g.reshape(b, -1), dim=1).pow(2) for g in grads.values()).sqrt()


def hook_sqnorms(view, batch: Batch, plan: Plan, names: list[str], clone: set[str], dtype: torch.dtype,
                 features: Callable[[], torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """Exact squared per-example gradient norms ``(B,)`` float64 on the CPU from one
    batched pass of the hooks of ``plan`` (an exact plan: nothing projected); for
    single-call matrix layers without forming the gradients:
    ``||sum_t r_t c_t^T||^2 = sum_{t,s} (r_t . r_s)(c_t . c_s)``. ``features()`` gives
    the exact features, used when a layer is called more than once (its calls'
    gradients add up before the norm)."""
    b = batch_size_of(batch)
    subs = dict(view.module.named_modules())
    cap = capture(view, batch, plan.hooked, names, plan.broadcast, clone)
    calls = cap.calls
    by_unit = {m: u for u in plan.units for m, _ in u.uses}
    per_unit: dict[int, int] = {}
    for c in calls:
        if c.module in by_unit:
            per_unit[id(by_unit[c.module])] = per_unit.get(id(by_unit[c.module]), 0) + 1
    if any(v > 1 for v in per_unit.values()):  # shared layers: the calls' gradients add up first
        f = features()
        return torch.einsum("bd,bd->b", f.double(), f.double()).cpu()
    total = torch.zeros(b, dtype=torch.float64)
    rest: dict[str, torch.Tensor] = dict(cap.broadcast)
    for call in calls:
        if call.grad is None:
            continue
        mod = subs[call.module]
        u = by_unit.get(call.module)
        if u is not None:
            kind = dict(u.uses)[call.module]
            if kind == "embedding":  # (r_t . r_s) is 1 where the tokens are equal: no one-hot is formed
                idx = batch_major(call.a, b, "input", call.module).reshape(b, -1)
                dd = batch_major(call.grad, b, "output", call.module).reshape(b, idx.shape[1], -1).double()
                same = (idx.unsqueeze(2) == idx.unsqueeze(1)).double()
                if mod.padding_idx is not None:
                    keep = (idx != mod.padding_idx).double()
                    same = same * keep.unsqueeze(2) * keep.unsqueeze(1)
                total += (same * (dd @ dd.transpose(1, 2))).sum((1, 2)).cpu()
                continue
            r, c = row_col(kind, mod, call, b, None, None, u.bias is not None, dtype)
            t = r.shape[1]
            if t == 1:
                sq = r.pow(2).sum((1, 2)) * c.pow(2).sum((1, 2))
            elif t * t <= u.numel:
                sq = ((r @ r.transpose(1, 2)) * (c @ c.transpose(1, 2))).sum((1, 2))
            else:
                sq = torch.bmm(r.transpose(1, 2), c).pow(2).sum((1, 2))
            total += sq.double().cpu()
        if call.module in plan.vector:
            kind, sel = plan.vector[call.module]
            for n, g in vector_grads(kind, mod, call, b, sel).items():
                rest[n] = rest[n] + g if n in rest else g
    if plan.fallback:
        rest.update(per_example_grads_loop(view, plan.fallback, batch))
    for g in rest.values():
        total += g.reshape(b, -1).double().pow(2).sum(1).cpu()
    return total
