"""DataInf: a layer-wise closed form of the inverse damped empirical Fisher."""

from __future__ import annotations

import torch

from ..distributed import all_reduce_sum
from .base import InverseHessian, MemberInputs, query_dtype


def layer_slices(params) -> list[tuple[str, slice]]:
    """Contiguous feature slices, one per module (a weight and its bias share a layer),
    from ``(name, numel)`` pairs in flat-gradient order."""
    out: list[tuple[str, slice]] = []
    start = 0
    for k, size in params:
        layer = k.rsplit(".", 1)[0] if "." in k else ""
        if out and out[-1][0] == layer and out[-1][1].stop == start:
            out[-1] = (layer, slice(out[-1][1].start, start + size))
        else:
            out.append((layer, slice(start, start + size)))
        start += size
    return out


class DataInf(InverseHessian):
    """DataInf (Kwon et al., 2024): per layer l the Hessian is replaced by the damped
    empirical Fisher ``G_l = (1/n) sum_i g_il g_il^T + lambda_l I`` and its inverse
    by the average of rank-one inverses (Sherman-Morrison),

        G_l^{-1} v ~= (1 / lambda_l) * (v - (1/n) sum_i (g_il . v) / (lambda_l + ||g_il||^2) g_il),

    exact when n = 1 and a cheap approximation otherwise; layers are
    independent (block-diagonal). One pass over the stored training gradients
    per solve; no Hessian-vector products.

    Args:
        damping: ``lambda_l`` for every layer; ``None`` (default) uses the
            paper's rule ``lambda_l = 0.1 * mean_i ||g_il||^2 / D_l``.
    """

    name = "datainf"
    collective = True  # every solve sums over all ranks' training rows

    def _prepare(self, member: MemberInputs):
        if member.name not in self._state:
            layers = layer_slices(member.params)
            sq = torch.zeros(len(layers), dtype=torch.float64)
            for _, feats in member.fisher_blocks():
                f = feats.double()
                for j, (_, sl) in enumerate(layers):
                    sq[j] += f[:, sl].pow(2).sum().cpu()
            mean_sq = torch.from_numpy(all_reduce_sum(sq.numpy())) / member.n_train
            if self.damping is None:
                lams = torch.tensor([0.1 * float(mean_sq[j]) / (sl.stop - sl.start) for j, (_, sl) in enumerate(layers)],
                                    dtype=torch.float64)
                lams = lams.clamp_min(1e-12).double()
            else:
                if self.damping <= 0:
                    raise ValueError("DataInf needs damping > 0 (or None for the paper's per-layer rule)")
                lams = torch.full((len(layers),), float(self.damping), dtype=torch.float64)
            self._state[member.name] = (layers, lams)
            self.report[member.name] = {
                "method": self.name,
                "dim": sum(sl.stop - sl.start for _, sl in layers),
                "layers": [name or "<root>" for name, _ in layers],
                "damping_per_layer": [float(x) for x in lams],
            }
        return self._state[member.name]

    def solve(self, member, vectors):
        layers, lams = self._prepare(member)
        v = vectors.double().cpu()
        acc = torch.zeros_like(v)
        for _, feats in member.fisher_blocks():
            g = feats.double().cpu()
            for j, (_, sl) in enumerate(layers):
                gl = g[:, sl]
                coef = (v[:, sl] @ gl.T) / (lams[j] + gl.pow(2).sum(1))[None, :]
                acc[:, sl] += coef @ gl
        acc = torch.from_numpy(all_reduce_sum(acc.numpy()))  # each rank streams its own rows
        out = torch.empty_like(v)
        for j, (_, sl) in enumerate(layers):
            out[:, sl] = (v[:, sl] - acc[:, sl] / member.n_train) / lams[j]
        return query_dtype(out, vectors)
