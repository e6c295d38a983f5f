"""The Hessian of the mean training loss, through torch.func.

Everything here works on the SELECTED parameters of one member, flattened in
``names`` order (the same order as the per-example gradient features), and on
the training objective the estimator was fitted on:

    L(theta) = (1/n) * sum_i w_i * l(z_i; theta)

(``w_i`` the sample weights when the data carries them), so that
``H = d^2 L / d theta^2`` is the Hessian of the MEAN training loss. A damping
``lambda`` adds ``lambda * I``: for a model trained on ``L + (lambda/2)||theta||^2``
(SGD ``weight_decay=lambda`` on the mean loss) the damped Hessian is exactly the
Hessian of the training objective.

Hessian-vector products are forward-over-reverse (``jvp`` of ``grad``), one
pass over the training data each; they are computed in the model's dtype and
accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.func import grad, jvp, vmap

from ..data import DataSource, to_device

if TYPE_CHECKING:
    from ..members import MemberView


class Objective:
    """The mean training loss of one member as a function of its flat selected parameters.

    Args:
        view: the member (inside its ``with`` block, module in eval mode).
        names: selected parameter names, in feature order.
        source: the training data.
        device: where batches are moved.
    """

    def __init__(self, view: MemberView, names: list[str], source: DataSource, device: torch.device):
        self.view, self.names, self.source, self.device = view, names, source, device
        self.shapes = [tuple(view.params[k].shape) for k in names]
        self.sizes = [view.params[k].numel() for k in names]
        self.dim = int(sum(self.sizes))
        self.dtype = view.params[names[0]].dtype
        self.point = {k: view.params[k].detach() for k in names}

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.sizes)
        return {k: p.reshape(s) for k, p, s in zip(self.names, parts, self.shapes)}

    def _batch_sum(self, batch) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        task, view = self.view.task, self.view

        def loss_sum(selected: dict[str, torch.Tensor]) -> torch.Tensor:
            return task.per_example_loss(view.functional(selected), batch).sum()

        return loss_sum

    def _batches(self, batch_indices: torch.Tensor | None = None):
        if batch_indices is None:
            for _, batch in self.source.batches():
                yield to_device(batch, self.device)
        else:
            from ..data import map_batch

            data = self.source.tensors()
            yield to_device(map_batch(data, lambda t: t[batch_indices.to(t.device)]), self.device)

    def hvp(self, vectors: torch.Tensor, batch_indices: torch.Tensor | None = None) -> torch.Tensor:
        """``H v`` for each row of ``vectors`` ``(k, D)``, returned in float64 ``(k, D)``.

        With ``batch_indices`` the Hessian is that of the mean loss over those
        training examples only (a stochastic estimate, used by LiSSA).
        """
        vecs = vectors.to(device=self.device, dtype=self.dtype)
        out = torch.zeros(vectors.shape, dtype=torch.float64, device=self.device)
        count = 0
        for batch in self._batches(batch_indices):
            loss_sum = self._batch_sum(batch)

            def one(v: torch.Tensor, loss_sum=loss_sum) -> torch.Tensor:
                _, tangent_out = jvp(grad(loss_sum), (self.point,), (self.unflatten(v),))
                return torch.cat([tangent_out[k].reshape(-1) for k in self.names])

            out += vmap(one)(vecs).double()
            count += _batch_len(batch)
        return out / count

    def hessian(self, chunk: int = 64) -> torch.Tensor:
        """The explicit ``(D, D)`` Hessian of the mean training loss (float64),
        built from ``D`` Hessian-vector products with basis vectors, ``chunk`` at a time."""
        d = self.dim
        h = torch.empty((d, d), dtype=torch.float64, device=self.device)
        for s in range(0, d, chunk):
            e = torch.zeros((min(chunk, d - s), d), dtype=self.dtype, device=self.device)
            e[torch.arange(e.shape[0]), torch.arange(s, s + e.shape[0])] = 1
            h[s : s + e.shape[0]] = self.hvp(e)
        return 0.5 * (h + h.T)

    def power_top_eigenvalue(self, iterations: int = 20, seed: int = 0) -> float:
        """Largest-magnitude eigenvalue of ``H`` by power iteration (for LiSSA's scale)."""
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(self.dim, generator=gen, dtype=torch.float64).to(self.device)
        v /= v.norm()
        lam = 0.0
        for _ in range(iterations):
            hv = self.hvp(v[None])[0]
            lam = float(v @ hv)
            norm = hv.norm()
            if float(norm) == 0.0:
                return 0.0
            v = hv / norm
        return abs(lam)


def _batch_len(batch) -> int:
    from ..data import batch_size_of

    return batch_size_of(batch)
