"""Projected per-example gradients: hook-captured Kronecker factors and a dense fallback.

:class:`ProjectedFeatures` turns a batch into ``(B, k)`` projected per-example
gradients for one member, and maps full gradients (a target gradient, or
explicit per-example gradients in tests) through the very same matrices, so
``features(batch)[i] . project_flat(g) ~ grad l(z_i) . g`` (unbiased).

The factorized path runs one forward and one backward pass of the batch (the
backward stops at the layer outputs; no weight gradient is formed). A forward
hook on every supported layer, registered in front of any other hook (such as a
dropout member's mask), records the layer input ``a`` and its raw output; the
output-gradient ``d`` comes from ``torch.autograd.grad(loss, outputs)``. The
member's parameters are used through ``MemberView.functional`` (so hooks on the
real submodules fire with the member's values swapped in).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Batch, batch_size_of
from ..projections import Dense, Factorized, Projection, Unit, plan_units
from .functional import _check_vmappable, flat_per_example_grads


class ProjectedFeatures:
    """Projected features for one member's module and parameter selection.

    Args:
        projection: a :class:`~hessfree.projections.Dense` or
            :class:`~hessfree.projections.Factorized`.
        view: the member (its module and parameters).
        names: the selected parameter names (the flat-gradient order).
    """

    def __init__(self, projection: Projection, view, names: list[str]):
        self.projection, self.names = projection, list(names)
        self.shapes = {n: tuple(view.params[n].shape) for n in names}
        total = sum(view.params[n].numel() for n in names)
        if isinstance(projection, Factorized):
            self.units = plan_units(view.module, names, view.params, projection.dim)
        elif isinstance(projection, Dense):
            self.units = [Unit("dense", "", list(names), 1, total, k_rows=1, k_cols=projection.dim)]
        else:
            raise TypeError(f"projection must be hf.projections.Dense or Factorized, got {type(projection).__name__}")
        self.dim = sum(u.k for u in self.units)

    # ---- matrices ------------------------------------------------------------------
    def _dense(self, unit: Unit) -> Dense | None:
        if isinstance(self.projection, Dense):
            return self.projection
        if unit.k >= unit.numel:
            return None
        return Dense(unit.k_cols, kind=self.projection.kind, seed=self.projection.seed)

    def _factors(self, unit: Unit, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        p = self.projection
        return (
            p.factor(f"{unit.module}/rows", unit.rows, unit.k_rows, device),
            p.factor(f"{unit.module}/cols", unit.cols, unit.k_cols, device),
        )

    # ---- full gradients -> features ---------------------------------------------------
    def project_grads(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Project full gradients ``{name: (B, *param.shape)}`` -> ``(B, dim)`` fp32."""
        b = next(iter(grads.values())).shape[0]
        parts = []
        for u in self.units:
            if u.kind == "dense":
                flat = torch.cat([grads[n].reshape(b, -1).float() for n in u.names], dim=1)
                dense = self._dense(u)
                parts.append(flat if dense is None else dense.project(flat, key="fallback"))
                continue
            g = grads[u.weight].float().reshape(b, u.rows, -1)
            if u.bias is not None:
                g = torch.cat([g, grads[u.bias].float().reshape(b, u.rows, 1)], dim=2)
            p_rows, p_cols = self._factors(u, g.device)
            if p_rows is not None:
                g = torch.matmul(p_rows.T, g)
            if p_cols is not None:
                g = torch.matmul(g, p_cols)
            parts.append(g.reshape(b, -1))
        return torch.cat(parts, dim=1)

    def project_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Project flat gradients ``(D,)`` -> ``(dim,)`` or ``(B, D)`` -> ``(B, dim)``."""
        single = flat.dim() == 1
        rows = flat.reshape(1, -1) if single else flat
        grads, start = {}, 0
        for n in self.names:
            size = 1
            for s in self.shapes[n]:
                size *= s
            grads[n] = rows[:, start : start + size].reshape(rows.shape[0], *self.shapes[n])
            start += size
        out = self.project_grads(grads)
        return out[0] if single else out

    # ---- per-example features of a batch ---------------------------------------------
    def features(self, view, batch: Batch) -> torch.Tensor:
        """Projected per-example gradients of ``batch``, ``(B, dim)`` fp32.

        Each layer's block is written in place into one preallocated output
        (no per-layer temporaries of the output's size).
        """
        b = batch_size_of(batch)
        out = torch.empty(b, self.dim, device=view.params[self.names[0]].device)
        starts = [0]
        for u in self.units:
            starts.append(starts[-1] + u.k)
        layers = [i for i, u in enumerate(self.units) if u.kind != "dense"]
        if layers:
            self._hooked(view, batch, layers, out, starts)
        for i, u in enumerate(self.units):
            if u.kind == "dense":
                flat = flat_per_example_grads(view, u.names, batch).float()
                dense = self._dense(u)
                out[:, starts[i] : starts[i + 1]] = flat if dense is None else dense.project(flat, key="fallback")
        return out

    def _capture(self, view, batch: Batch, layers: list[int]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """One forward + backward pass: ``(unit, layer input, output-gradient)`` per layer call."""
        _check_vmappable(batch)
        subs = dict(view.module.named_modules())
        calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        handles = []
        for i in layers:

            def capture(mod, inp, output, i=i):
                calls.append((i, inp[0].detach(), output))
                return output.clone()  # later in-place ops must not touch the captured output

            handles.append(subs[self.units[i].module].register_forward_hook(capture, prepend=True))
        selected = {
            n: view.params[n].detach().requires_grad_(True) for i in layers for n in self.units[i].names
        }
        try:
            with torch.enable_grad():
                loss = view.task.per_example_loss(view.functional(selected), batch).sum()
                outs = [o for _, _, o in calls]
                d_outs = torch.autograd.grad(loss, outs, allow_unused=True) if outs else []
        finally:
            for h in handles:
                h.remove()
        return [(i, a, d.detach()) for (i, a, _), d in zip(calls, d_outs) if d is not None]

    def _hooked(self, view, batch: Batch, layers: list[int], out: torch.Tensor, starts: list[int]) -> None:
        subs = dict(view.module.named_modules())
        b = out.shape[0]
        written: set[int] = set()
        for i, a, d in self._capture(view, batch, layers):
            u = self.units[i]
            r, c = self._row_col(u, subs[u.module], a, d)
            block = out[:, starts[i] : starts[i + 1]].view(b, u.k_rows, u.k_cols)  # strided view, written in place
            if i in written:  # the layer ran more than once (shared weights): gradients add up
                block.baddbmm_(r.transpose(1, 2), c)
            else:
                torch.bmm(r.transpose(1, 2), c, out=block)
                written.add(i)
        for i in layers:
            if i not in written:  # the layer did not affect the loss
                out[:, starts[i] : starts[i + 1]] = 0.0

    @property
    def exact(self) -> bool:
        """True when nothing is projected (``Factorized(None)`` or layers within their share)."""
        return all(u.k == u.numel for u in self.units) and not isinstance(self.projection, Dense)

    def sqnorms(self, view, batch: Batch) -> torch.Tensor:
        """Exact squared per-example gradient norms ``(B,)`` without forming the
        gradients (exact engines only): per layer call ``||sum_t r_t c_t^T||^2 =
        sum_{t,s} (r_t . r_s)(c_t . c_s)``, or the formed block when that is smaller."""
        if not self.exact:
            raise ValueError("sqnorms without features needs an exact engine (Factorized(None))")
        b = batch_size_of(batch)
        total = torch.zeros(b, dtype=torch.float64)
        layers = [i for i, u in enumerate(self.units) if u.kind != "dense"]
        subs = dict(view.module.named_modules())
        calls = self._capture(view, batch, layers) if layers else []
        counts: dict[int, int] = {}
        for i, _, _ in calls:
            counts[i] = counts.get(i, 0) + 1
        if any(c > 1 for c in counts.values()):  # shared layers: the calls' gradients add up first
            f = self.features(view, batch)
            return torch.einsum("bd,bd->b", f, f).double().cpu()
        for i, a, d in calls:
            u, mod = self.units[i], subs[self.units[i].module]
            if u.kind == "embedding":
                idx = a.reshape(b, -1)
                dd = d.reshape(b, idx.shape[1], -1).float()
                same = (idx.unsqueeze(2) == idx.unsqueeze(1)).float()
                if mod.padding_idx is not None:
                    keep = (idx != mod.padding_idx).float()
                    same = same * keep.unsqueeze(2) * keep.unsqueeze(1)
                total += (same * (dd @ dd.transpose(1, 2))).sum((1, 2)).double().cpu()
                continue
            r, c = self._row_col(u, mod, a, d)
            t = r.shape[1]
            if t == 1:
                sq = r.pow(2).sum((1, 2)) * c.pow(2).sum((1, 2))
            elif t * t <= u.numel:
                sq = ((r @ r.transpose(1, 2)) * (c @ c.transpose(1, 2))).sum((1, 2))
            else:
                sq = torch.bmm(r.transpose(1, 2), c).pow(2).sum((1, 2))
            total += sq.double().cpu()
        for u in self.units:
            if u.kind == "dense":
                flat = flat_per_example_grads(view, u.names, batch).float()
                total += torch.einsum("bd,bd->b", flat, flat).double().cpu()
        return total

    def _row_col(self, u: Unit, mod: nn.Module, a: torch.Tensor, d: torch.Tensor):
        """Projected row and column vectors ``(B, T, k_rows)``, ``(B, T, k_cols)`` of one call."""
        b = d.shape[0]
        p_rows, p_cols = self._factors(u, d.device)
        if u.kind == "embedding":
            idx = a.reshape(b, -1)
            d = d.reshape(b, idx.shape[1], -1).float()
            r = p_rows[idx] if p_rows is not None else F.one_hot(idx, u.rows).float()
            if mod.padding_idx is not None:
                r = r * (idx != mod.padding_idx).unsqueeze(-1).to(r.dtype)
            return r, (d if p_cols is None else d @ p_cols)
        if u.kind == "linear":
            a = a.reshape(b, -1, a.shape[-1]).float()
            d = d.reshape(b, -1, d.shape[-1]).float()
        else:
            d = d.reshape(b, d.shape[1], -1).transpose(1, 2).float()
            if p_cols is not None:  # P_cols^T patches == a convolution with k_cols filters (no unfold)
                r = d if p_rows is None else d @ p_rows
                return r, _projected_patches(mod, a.float(), p_cols, u.bias is not None)
            a = _unfold(mod, a.float())  # (B, L, C_in * kernel) patches
        r = d if p_rows is None else d @ p_rows
        n_in = a.shape[-1]
        if p_cols is None:
            c = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1) if u.bias is not None else a
        else:
            c = a @ p_cols[:n_in]
            if u.bias is not None:
                c = c + p_cols[n_in]
        return r, c


def _projected_patches(mod: nn.Module, a: torch.Tensor, p_cols: torch.Tensor, bias: bool) -> torch.Tensor:
    """``unfold(a) @ p_cols`` computed as a convolution whose filters are the columns
    of ``p_cols`` (same stride, padding, dilation), ``(B, L, k_cols)``."""
    n_in = mod.in_channels * math.prod(mod.kernel_size)
    filters = p_cols[:n_in].T.reshape(p_cols.shape[1], mod.in_channels, *mod.kernel_size)
    conv = F.conv1d if isinstance(mod, nn.Conv1d) else F.conv2d
    c = conv(a, filters, stride=mod.stride, padding=mod.padding, dilation=mod.dilation)
    c = c.flatten(2).transpose(1, 2)
    return c + p_cols[n_in] if bias else c


def _unfold(mod: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Input patches of a convolution, ``(B, L, C_in * prod(kernel))`` in weight order."""
    if isinstance(mod, nn.Conv1d):
        patches = F.unfold(
            a.unsqueeze(2),
            kernel_size=(1, mod.kernel_size[0]),
            dilation=(1, mod.dilation[0]),
            padding=(0, mod.padding[0]),
            stride=(1, mod.stride[0]),
        )
    else:
        patches = F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
    return patches.transpose(1, 2)

