from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn

torch.set_num_threads(2)


class EmbedBag(nn.Module):
    """A tiny text classifier with an embedding, used to test dict batches."""

    def __init__(self, vocab: int = 20, dim: int = 6, n_out: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, n_out)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True).clamp_min(1)
        return self.head(pooled)


def mlp(n_in=5, hidden=8, n_out=3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out)).to(dtype)


@pytest.fixture
def blobs():
    """(X, y) float64 classification data: 40 examples, 5 features, 3 classes."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


@pytest.fixture
def val_blobs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    groups = (x[:, 3] > 0).long()
    return x, y, groups


def loop_grads(model, loss_of_one, n, names):
    """Reference per-example gradients from a plain autograd loop."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(n):
        loss = loss_of_one(i)
        grads = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(params[k])).reshape(-1) for g, k in zip(grads, names)]))
    return torch.stack(rows)


def spearman(a, b):
    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@contextmanager
def crash_at_batch(n: int):
    """The ``n``-th per-batch feature computation inside the block raises
    ``RuntimeError("simulated crash")`` (a process dying mid-fit); the block must
    raise it, and the estimator is restored afterwards."""
    import hessfree as hf

    real, calls = hf.Influence._features, []

    def failing(self, view, names, batch):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("simulated crash")
        return real(self, view, names, batch)

    hf.Influence._features = failing
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            yield
    finally:
        hf.Influence._features = real
