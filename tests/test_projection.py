"""Projections: unbiased inner products, and hook-factorized features equal to
projecting explicit (autograd-loop) per-example gradients with the same matrices."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import hessfree as hf
from hessfree.gradients.projected import ProjectedFeatures
from hessfree.members import AsIs, Dropout, MemberView
from hessfree.projections import Dense, Factorized, random_matrix


def loop_grads(view, names, batch):
    """Per-example gradients by a Python loop of autograd calls: {name: (B, *shape)}."""
    keys = batch.keys() if isinstance(batch, dict) else None
    n = (next(iter(batch.values())) if keys else batch[0]).shape[0]
    out = {k: [] for k in names}
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in batch.items()} if keys else tuple(v[i : i + 1] for v in batch)
        sel = {k: view.params[k].detach().clone().requires_grad_(True) for k in names}
        loss = view.task.per_example_loss(view.functional(sel), one).sum()
        grads = torch.autograd.grad(loss, list(sel.values()), allow_unused=True)
        for k, g in zip(names, grads):
            out[k].append(torch.zeros_like(sel[k]) if g is None else g)
    return {k: torch.stack(v) for k, v in out.items()}


def make_view(task, batch, spec=None):
    spec = spec or AsIs().specs()[0]
    example = {k: v[:1] for k, v in batch.items()} if isinstance(batch, dict) else tuple(v[:1] for v in batch)
    return MemberView(spec, task.model, task, example, torch.device("cpu"))


# ---- dense -------------------------------------------------------------------------------


def test_dense_blocks_assemble_to_the_matrix_used_by_project():
    proj = Dense(16, kind="gaussian", seed=3, block_rows=7)
    x = torch.randn(5, 30, dtype=torch.float64).float()
    p = torch.cat([proj.block(s, min(s + 7, 30), key="k") for s in range(0, 30, 7)])
    assert p.shape == (30, 16)
    torch.testing.assert_close(proj.project(x, key="k"), x @ p, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(proj.project(x, key="k"), proj.project(x, key="other"))
    # pieces stand for their concatenation: cuts inside blocks, on block edges, a piece over several blocks
    for widths in ([3, 4, 23], [7, 7, 16], [1, 28, 1], [30]):
        pieces = list(torch.split(x, widths, dim=1))
        torch.testing.assert_close(proj.project(pieces, key="k"), x @ p, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expects"):
        proj.project([x, x[:3]])


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_dense_inner_products_are_unbiased(kind):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 40, generator=gen)
    y = 0.6 * x + y  # correlated, so the exact inner product is far from 0
    exact = float(x @ y)
    est = []
    for seed in range(300):
        proj = Dense(8, kind=kind, seed=seed)
        px, py = proj.project(torch.stack([x, y]))
        est.append(float(px @ py))
    est = np.array(est)
    sem = est.std() / np.sqrt(len(est))
    assert abs(est.mean() - exact) < 4 * sem, (est.mean(), exact, sem)
    # the estimator really is noisy at k = 8 (so the test above has teeth)
    assert est.std() > 0.1 * abs(exact)


def test_random_matrix_scale():
    m = random_matrix(4000, 50, "rademacher", 0, "x")
    assert set(torch.unique(m * np.sqrt(50)).round().tolist()) == {-1.0, 1.0}
    g = random_matrix(4000, 50, "gaussian", 0, "x")
    assert abs(float(g.var()) * 50 - 1) < 0.05


def test_bad_projection_arguments():
    with pytest.raises(ValueError, match="dim"):
        Dense(0)
    with pytest.raises(ValueError, match="kind"):
        Dense(4, kind="sparse")
    with pytest.raises(TypeError, match="projection"):
        hf.Influence(hf.ClassificationTask(nn.Linear(2, 2)), projection="dense")


# ---- factorized == projected explicit gradients -------------------------------------------


class SeqModel(nn.Module):
    """Embedding (padding_idx=0) -> Linear per token -> LayerNorm -> masked mean -> Linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12, padding_idx=0)
        self.tok = nn.Linear(12, 9)
        self.norm = nn.LayerNorm(9)
        self.head = nn.Linear(9, 3)

    def forward(self, input_ids, attention_mask):
        h = self.norm(torch.tanh(self.tok(self.emb(input_ids))))
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 5, 3, stride=2, padding=1)
        self.c2 = nn.Conv1d(5, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))  # (B, 5, 4, 4)
        h = torch.relu(self.c2(h.flatten(2)))  # (B, 4, 16)
        return self.fc(h.flatten(1))


def _mlp():
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(inplace=True), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))


def _seq_batch(n=7):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30, (n, 6), generator=gen)
    mask = torch.ones(n, 6, dtype=torch.long)
    for i in range(n):
        pad = i % 4
        if pad:
            ids[i, -pad:] = 0
            mask[i, -pad:] = 0
    ids[0, 1] = 0  # a padding token inside an unmasked position: padding_idx still gets no gradient
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=gen)}


CASES = {
    "mlp": (_mlp, lambda: (torch.randn(7, 6), torch.randint(0, 3, (7,)), torch.rand(7) + 0.5)),
    "conv": (ConvNet, lambda: (torch.randn(5, 2, 8, 8), torch.randint(0, 3, (5,)))),
    "sequence": (SeqModel, _seq_batch),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dim", [24, None])
def test_factorized_features_equal_projected_explicit_gradients(case, dim):
    torch.manual_seed(0)
    make_model, make_batch = CASES[case]
    model, batch = make_model(), make_batch()
    task = hf.ClassificationTask(model)
    view = make_view(task, batch)
    names = [n for n, _ in model.named_parameters()]
    engine = ProjectedFeatures(Factorized(dim, seed=5), view, names)
    kinds = {u.kind for u in engine.units}
    assert kinds >= {"linear"}
    if dim is not None:  # really projected (some side of some layer is reduced)
        assert any(u.k < u.numel for u in engine.units)
    with view:
        hooked = engine.features(view, batch)
        explicit = loop_grads(view, names, batch)
    expected = engine.project_grads(explicit)
    assert hooked.shape == (batch_rows(batch), engine.dim)
    torch.testing.assert_close(hooked, expected, rtol=1e-4, atol=1e-5)
    if dim is None:  # nothing projected: inner products are the exact gradient inner products
        flat = torch.cat([explicit[n].reshape(len(hooked), -1) for n in names], 1)
        torch.testing.assert_close(hooked @ hooked.T, flat @ flat.T, rtol=1e-4, atol=1e-5)


def batch_rows(batch):
    return (next(iter(batch.values())) if isinstance(batch, dict) else batch[0]).shape[0]


def test_sequence_model_uses_all_three_paths():
    model = SeqModel()
    view = make_view(hf.ClassificationTask(model), _seq_batch())
    engine = ProjectedFeatures(Factorized(60, seed=0), view, [n for n, _ in model.named_parameters()])
    assert [u.kind for u in engine.units] == ["embedding", "linear", "dense", "linear"]
    assert engine.dim <= 60


def test_factorized_honours_dropout_member_masks():
    torch.manual_seed(0)
    model = _mlp()
    task = hf.ClassificationTask(model)
    batch = (torch.randn(6, 6), torch.randint(0, 3, (6,)))
    spec = Dropout(n=1, p_max=0.9, seed=2).specs()[0]
    view = make_view(task, batch, spec)
    names = [n for n, _ in model.named_parameters()]
    engine = ProjectedFeatures(Factorized(40, seed=1), view, names)
    with view:
        hooked = engine.features(view, batch)
        explicit = loop_grads(view, names, batch)
    torch.testing.assert_close(hooked, engine.project_grads(explicit), rtol=1e-4, atol=1e-5)
    plain = make_view(task, batch)
    with plain:
        unmasked = engine.project_grads(loop_grads(plain, names, batch))
    assert not torch.allclose(hooked, unmasked, atol=1e-4)  # the masks mattered


def test_factorized_inner_products_are_unbiased():
    torch.manual_seed(0)
    model = ConvNet()
    task = hf.ClassificationTask(model)
    batch = (torch.randn(2, 2, 8, 8), torch.randint(0, 3, (2,)))
    view = make_view(task, batch)
    names = [n for n, _ in model.named_parameters()]
    with view:
        g = loop_grads(view, names, batch)
    flat = torch.cat([g[n].reshape(2, -1) for n in names], 1)
    exact = float(flat[0] @ flat[1])
    est = []
    for seed in range(300):
        engine = ProjectedFeatures(Factorized(30, seed=seed), view, names)
        f = engine.project_flat(flat)
        est.append(float(f[0] @ f[1]))
    est = np.array(est)
    sem = est.std() / np.sqrt(len(est))
    assert abs(est.mean() - exact) < 4 * sem, (est.mean(), exact, sem)
    assert est.std() > 0.05 * abs(exact)


# ---- through the estimator -----------------------------------------------------------------


def _fitted(projection, members=None, n=40):
    torch.manual_seed(0)
    model = _mlp()
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    task = hf.ClassificationTask(model)
    est = hf.Influence(task, members, projection=projection, batch_size=16).fit((x, y))
    target = hf.targets.Utility((torch.randn(10, 6), torch.randint(0, 3, (10,))))
    return est, target, (x, y)


def test_estimator_scores_equal_projected_explicit_inner_products():
    est, target, (x, y) = _fitted(Factorized(20, seed=4))
    scores = est.influence(target)
    (m, view), = list(est._views())
    names = est._names[0]
    with view:
        pass
    engine = est._engines[0]
    with view:
        feats = engine.project_grads(loop_grads(view, names, (x, y)))
        from hessfree.gradients.functional import flatten

        q = engine.project_flat(flatten(target.gradient(view, names), names))
    np.testing.assert_allclose(scores, (feats @ q).double().numpy(), rtol=1e-4, atol=1e-6)
    assert est.feature_dim == [engine.dim]


def test_projection_seeds_are_averaged_members():
    seeds = [Dense(12, seed=s) for s in range(3)]
    est, target, _ = _fitted(seeds)
    assert len(est.member_names) == 3 and np.allclose(est.member_weights, 1 / 3)
    each = [_fitted(p)[0].influence(target) for p in seeds]
    np.testing.assert_allclose(est.influence(target), np.mean(each, 0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(est.influence(target, reduce=None).sum(0), np.mean(each, 0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_sqnorms_without_forming_gradients(case):
    torch.manual_seed(0)
    make_model, make_batch = CASES[case]
    model, batch = make_model(), make_batch()
    view = make_view(hf.ClassificationTask(model), batch)
    names = [n for n, _ in model.named_parameters()]
    engine = ProjectedFeatures(Factorized(None), view, names)
    assert engine.exact
    with view:
        sq = engine.sqnorms(view, batch)
        g = loop_grads(view, names, batch)
    want = sum(g[n].reshape(len(sq), -1).double().pow(2).sum(1) for n in names)
    torch.testing.assert_close(sq, want, rtol=1e-4, atol=1e-7)


def test_estimator_self_influence_norms_only_path_equals_vmap():
    torch.manual_seed(0)
    model = ConvNet()
    task = hf.ClassificationTask(model)
    data = (torch.randn(20, 2, 8, 8), torch.randint(0, 3, (20,)))
    members = hf.members.WeightNoise(n=2, sigma=0.1)
    fast = hf.Influence(task, members, projection=Factorized(None), max_cache_bytes=0, batch_size=8).fit(data)
    ref = hf.Influence(task, members, batch_size=8).fit(data)
    np.testing.assert_allclose(fast.self_influence(reduce=None), ref.self_influence(reduce=None), rtol=1e-4)


def test_dense_block_cache_changes_nothing_but_reuses_blocks():
    x = torch.randn(5, 5000)
    cached = Dense(64, seed=3, block_rows=1024, cache_bytes=2 * 1024 * 64 * 4)  # room for two blocks of five
    plain = Dense(64, seed=3, block_rows=1024, cache_bytes=0)
    first, again = cached.project(x, key="w"), cached.project(x, key="w")
    torch.testing.assert_close(first, plain.project(x, key="w"), rtol=0, atol=0)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert len(cached._blocks) == 2 and cached.block(0, 1024, "w") is cached.block(0, 1024, "w")
    assert plain._blocks == {} and cached.describe() == plain.describe()
    with pytest.raises(ValueError, match="cache_bytes must be an integer >= 0"):
        Dense(8, cache_bytes=-1)


def test_a_dense_projection_as_wide_as_the_gradient_is_announced():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)  # 18 gradient entries
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    with pytest.warns(UserWarning, match=r"Dense\(18\) projects 18 gradient entries .*projection=None"):
        hf.Influence(hf.ClassificationTask(model), projection=hf.projections.Dense(18)).fit((x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.Influence(hf.ClassificationTask(model), projection=hf.projections.Dense(17)).fit((x, y))
