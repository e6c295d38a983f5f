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

Hessian-vector products are double backward passes through the gradient
graph of each training batch (built once per member and kept), computed in the
model's dtype and accumulated in float64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..data import DataSource, batch_size_of, map_batch, to_device

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

    def __init__(
        self, view: MemberView, names: list[str], source: DataSource, device: torch.device, keep_graph: bool = True
    ):
        self.view, self.names, self.source, self.device = view, names, source, device
        self.keep_graph = keep_graph
        self._graphs = None
        self.shapes = [tuple(view.params[k].shape) for k in names]
        self.sizes = [view.params[k].numel() for k in names]
        self.dim = int(sum(self.sizes))
        self.dtype = view.params[names[0]].dtype
        self.point = {k: view.params[k].detach() for k in names}

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.sizes)
        return {k: p.reshape(s) for k, p, s in zip(self.names, parts, self.shapes)}

    def _gradient_graphs(self, batch_indices: torch.Tensor | None):
        """Per batch: (leaves, the gradients of the batch loss sum built with create_graph that depend
        on the parameters, their positions among the parameters, batch size). A parameter the loss
        does not reach, or reaches only linearly, has no gradient graph: its rows of ``H`` are 0."""
        if batch_indices is None and self._graphs is not None:
            return self._graphs
        graphs = []
        task, view = self.view.task, self.view
        for batch in self._batches(batch_indices):
            leaves = {k: v.clone().requires_grad_(True) for k, v in self.point.items()}
            with torch.enable_grad():
                loss = task.per_example_loss(view.functional(leaves), batch).sum()
                grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
            used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            graphs.append((list(leaves.values()), [grads[i] for i in used], used, _batch_len(batch)))
        if batch_indices is None and self.keep_graph:
            self._graphs = graphs
        return graphs

    def _batches(self, batch_indices: torch.Tensor | None = None):
        if batch_indices is None:
            for _, batch in self.source.batches():
                yield to_device(batch, self.device)
        else:
            data = self.source.tensors()
            yield to_device(map_batch(data, lambda t: t[batch_indices.to(t.device)]), self.device)

    def hvp(self, vectors: torch.Tensor, batch_indices: torch.Tensor | None = None) -> torch.Tensor:
        """``H v`` for each row of ``vectors`` ``(k, D)``, returned in float64 ``(k, D)``.

        Double backward through the gradient graph of each training batch, which
        is built once and kept (``keep_graph``) for the full data. With
        ``batch_indices`` the Hessian is that of the mean loss over those
        training examples only (a stochastic estimate, used by LiSSA).

        Raises:
            RuntimeError: an operation of the model has no second derivative in torch
                (e.g. fused attention on the CPU); the message names the fix.
        """
        try:
            return self._hvp(vectors, batch_indices)
        except RuntimeError as e:
            if "derivative for" not in str(e) or "not implemented" not in str(e):
                raise
            raise RuntimeError(
                f"a Hessian-vector product needs second derivatives, and an operation of the model has none in torch "
                f"({str(e).splitlines()[0]}); for a transformers model load it with attn_implementation='eager' "
                "(fused attention kernels have no double backward), or use hessian='fisher' or 'datainf', which "
                "need first derivatives only"
            ) from e

    def _hvp(self, vectors: torch.Tensor, batch_indices: torch.Tensor | None = None) -> torch.Tensor:
        """The products, batch by batch (see :meth:`hvp`)."""
        vecs = vectors.to(device=self.device, dtype=self.dtype)
        out = torch.zeros(vectors.shape, dtype=torch.float64, device=self.device)
        count = 0
        tangents = list(torch.split(vecs, self.sizes, dim=1))
        for leaves, grads, used, b in self._gradient_graphs(batch_indices):
            count += b
            if not grads:  # the loss is at most linear in the parameters: H = 0 on this batch
                continue
            if vecs.shape[0] == 1:
                parts = [tangents[i][0].reshape(self.shapes[i]) for i in used]
                hv = torch.autograd.grad(grads, leaves, parts, retain_graph=True, allow_unused=True)
                hv = [torch.zeros(s, dtype=self.dtype, device=self.device) if h is None else h
                      for h, s in zip(hv, self.shapes)]
                out[0] += torch.cat([h.reshape(-1) for h in hv]).double()
            else:
                parts = [tangents[i].reshape(-1, *self.shapes[i]) for i in used]
                hv = torch.autograd.grad(grads, leaves, parts, retain_graph=True, is_grads_batched=True,
                                         allow_unused=True)
                hv = [torch.zeros((vecs.shape[0], *s), dtype=self.dtype, device=self.device) if h is None else h
                      for h, s in zip(hv, self.shapes)]
                out += torch.cat([h.reshape(vecs.shape[0], -1) for h in hv], dim=1).double()
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
    return batch_size_of(batch)
