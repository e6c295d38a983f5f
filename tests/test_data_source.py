"""DataSource's public reads that the store and training use: a fingerprint, a shuffled
epoch, the batch tiling and the batches at given row ranges."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hessfree.data import DataSource

X, Y = torch.randn(50, 3, generator=torch.Generator().manual_seed(0)), torch.arange(50)
FORMS = {
    "tensors": lambda x=X: (x, Y),
    "loader": lambda x=X: DataLoader(TensorDataset(x, Y), batch_size=7),
    "custom sampler": lambda x=X: DataLoader(TensorDataset(x, Y), batch_sampler=[list(range(0, 20)), list(range(20, 50))]),
}


@pytest.mark.parametrize("form", FORMS)
def test_tiling_and_batches_at_match_plain_iteration(form):
    source = DataSource(FORMS[form](), batch_size=8)
    plain = [(o, b) for o, b in source.batches()]
    assert source.tiling() == [(o, len(b[1])) for o, b in plain]
    wanted = source.tiling()[1:] if len(plain) > 1 else source.tiling()
    got = list(source.batches_at(wanted))
    assert [o for o, _ in got] == [o for o, _ in wanted]
    for o, b in got:
        assert torch.equal(b[0], X[o : o + len(b[1])]) and torch.equal(b[1], Y[o : o + len(b[1])])


@pytest.mark.parametrize("form", FORMS)
def test_the_fingerprint_follows_the_data(form):
    source = DataSource(FORMS[form](), batch_size=8)
    assert source.fingerprint() == DataSource(FORMS[form](), batch_size=5).fingerprint()
    changed = DataSource(FORMS[form](X.clone().index_fill_(0, torch.tensor([49]), 1.0)), batch_size=8)
    assert changed.fingerprint() != source.fingerprint()


def test_a_shuffled_epoch_is_a_permutation_drawn_from_the_generator():
    source = DataSource((X, Y), batch_size=8)
    batches = list(source.shuffled(torch.Generator().manual_seed(3)))
    assert [len(b[1]) for b in batches] == [8] * 6 + [2]
    order = torch.cat([b[1] for b in batches])
    assert torch.equal(order, torch.randperm(50, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(torch.cat([b[0] for b in batches]), X[order])
