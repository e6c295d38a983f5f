"""TracIn-CP, dropout, weight-noise and model members against hand-written sums."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import loop_grads, mlp
from torch import nn

import hessfree as hf


def utility_grad(model, xv, yv):
    loss = F.cross_entropy(model(xv), yv)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def train_grads(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    return loop_grads(model, lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), len(x), names)


def test_tracin_cp_equals_hand_written_sum(blobs, val_blobs, tmp_path):
    x, y = blobs
    xv, yv, _ = val_blobs
    model = mlp()
    states, lrs = [], [0.3, 0.2, 0.1]
    for k in range(3):
        states.append({n: p.detach().clone() + 0.05 * k for n, p in model.state_dict().items()})
    # one checkpoint as a file, to exercise lazy loading
    torch.save(states[1], tmp_path / "ckpt1.pt")
    ckpts = hf.members.Checkpoints([states[0], tmp_path / "ckpt1.pt", states[2]], lrs=lrs)
    est = hf.Influence(hf.ClassificationTask(model), members=ckpts).fit((x, y))
    scores = est.influence(hf.targets.Utility((xv, yv)))
    expected = np.zeros(len(x))
    expected_self = np.zeros(len(x))
    for state, lr in zip(states, lrs):
        ref = mlp()
        ref.load_state_dict(state)
        g = train_grads(ref, x, y)
        expected += lr * (g @ utility_grad(ref, xv, yv)).numpy()
        expected_self += lr * g.pow(2).sum(1).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(est.self_influence(), expected_self, rtol=1e-9)
    # the live model was not modified by evaluating checkpoints
    assert torch.equal(model[0].weight, mlp()[0].weight)


def test_reduce_none_rows_sum_to_ensemble_and_mean(blobs, val_blobs):
    x, y = blobs
    xv, yv, _ = val_blobs
    members = hf.members.Checkpoints([mlp(seed=s).state_dict() for s in range(2)], lrs=[0.5, 0.25]) * hf.members.Dropout(n=3, p_max=0.3)
    est = hf.Influence(hf.ClassificationTask(mlp()), members=members).fit((x, y))
    target = hf.targets.Utility((xv, yv))
    rows = est.influence(target, reduce=None)
    assert rows.shape == (6, len(x))
    np.testing.assert_allclose(rows.sum(0), est.influence(target), rtol=1e-12)
    np.testing.assert_allclose(rows.mean(0), est.influence(target, reduce="mean"), rtol=1e-12)
    np.testing.assert_allclose(est.self_influence(reduce=None).sum(0), est.self_influence(), rtol=1e-12)
    per_member = est.pairwise((xv[:4], yv[:4]), reduce=None)
    assert per_member.shape == (6, 4, len(x))
    np.testing.assert_allclose(per_member.sum(0), est.pairwise((xv[:4], yv[:4])), rtol=1e-12)
    np.testing.assert_allclose(per_member.mean(0), est.pairwise((xv[:4], yv[:4]), reduce="mean"), rtol=1e-12)
    assert est.member_weights.tolist() == [0.5] * 3 + [0.25] * 3


def test_dropout_member_equals_explicitly_masked_model(blobs, val_blobs):
    """A dropout member's score equals the score of a model with the same fixed mask written by hand."""
    x, y = blobs
    xv, yv, _ = val_blobs
    model = mlp(hidden=16)
    seed = next(s for s in range(100) if hf.members.Dropout(n=1, p_max=0.6, seed=s).specs()[0].masks[0].p > 0.3)
    members = hf.members.Dropout(n=1, p_max=0.6, seed=seed)
    est = hf.Influence(hf.ClassificationTask(model), members=members).fit((x, y))
    scores = est.influence(hf.targets.Utility((xv, yv)))
    p = members.specs()[0].masks[0].p
    keep = (torch.rand(16, generator=torch.Generator().manual_seed(members.specs()[0].masks[0].seed)) >= p).double() / (1 - p)
    assert 0 < keep.count_nonzero() < 16

    class Masked(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, z):
            return self.base[2](self.base[1](self.base[0](z) * keep))

    masked = Masked(model)
    g = loop_grads(masked, lambda i: F.cross_entropy(masked(x[i : i + 1]), y[i : i + 1]), len(x), [f"base.{n}" for n, _ in model.named_parameters()])
    loss = F.cross_entropy(masked(xv), yv)
    gv = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(masked.parameters()))])
    np.testing.assert_allclose(scores, (g @ gv).numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make", [lambda s: hf.members.Dropout(n=4, p_max=0.4, seed=s), lambda s: hf.members.WeightNoise(n=4, sigma=0.05, seed=s)])
def test_random_members_reproducible_by_seed_and_distinct(blobs, make):
    x, y = blobs
    task = hf.ClassificationTask(mlp())
    a = hf.Influence(task, members=make(0)).fit((x, y)).self_influence(reduce=None)
    b = hf.Influence(task, members=make(0)).fit((x, y)).self_influence(reduce=None)
    c = hf.Influence(task, members=make(1)).fit((x, y)).self_influence(reduce=None)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    for i in range(4):  # every member differs from every other one
        for j in range(i):
            assert not np.allclose(a[i], a[j])


def test_weight_noise_member_equals_perturbed_model(blobs):
    x, y = blobs
    model = mlp()
    est = hf.Influence(hf.ClassificationTask(model), members=hf.members.WeightNoise(n=1, sigma=0.1, seed=7)).fit((x, y))
    gen = torch.Generator().manual_seed(hf.members.WeightNoise(n=1, sigma=0.1, seed=7).specs()[0].noise[0][1])
    noisy = mlp()
    with torch.no_grad():
        for p in noisy.parameters():
            p += 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
    np.testing.assert_allclose(est.self_influence(), train_grads(noisy, x, y).pow(2).sum(1).numpy(), rtol=1e-9)


def test_models_members_sum_over_models(blobs, val_blobs):
    x, y = blobs
    xv, yv, _ = val_blobs
    models = [mlp(seed=s) for s in range(3)]
    est = hf.Influence(hf.ClassificationTask(models[0]), members=hf.members.Models(models)).fit((x, y))
    expected = sum((train_grads(m, x, y) @ utility_grad(m, xv, yv)).numpy() for m in models)
    np.testing.assert_allclose(est.influence(hf.targets.Utility((xv, yv))), expected, rtol=1e-9, atol=1e-12)


class TiedMLP(nn.Module):
    """An MLP whose last layer reuses the first layer's weight (like an LM head tied to the embedding)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(5, 5).double()
        self.out = nn.Linear(5, 3).double()
        self.back = nn.Linear(5, 5, bias=False).double()
        self.back.weight = self.inp.weight

    def forward(self, x):
        return self.out(torch.tanh(self.back(torch.tanh(self.inp(x)))))


def tracin_by_hand(make, states, lrs, x, y, xv, yv):
    expected = np.zeros(len(x))
    for state, lr in zip(states, lrs):
        ref = make()
        ref.load_state_dict(state)
        expected += lr * (train_grads(ref, x, y) @ utility_grad(ref, xv, yv)).numpy()
    return expected


def test_tied_weights_saved_under_both_names_are_accepted_when_equal_and_refused_when_not(blobs, val_blobs):
    x, y = blobs
    xv, yv, _ = val_blobs
    model = TiedMLP()
    states = [{n: p + 0.03 * (k + 1) * torch.randn_like(p) for n, p in TiedMLP(seed=k + 1).state_dict().items()} for k in range(2)]
    for s in states:  # a tied model's own state_dict() names the shared tensor twice, with one value
        s["back.weight"] = s["inp.weight"].clone()
    assert set(states[0]) == {"inp.weight", "inp.bias", "out.weight", "out.bias", "back.weight"}
    assert [n for n, _ in model.named_parameters()] == ["inp.weight", "inp.bias", "out.weight", "out.bias"]
    lrs = [0.2, 0.1]
    est = hf.Influence(hf.ClassificationTask(model), members=hf.members.Checkpoints(states, lrs=lrs)).fit((x, y))
    expected = tracin_by_hand(TiedMLP, states, lrs, x, y, xv, yv)
    np.testing.assert_allclose(est.influence(hf.targets.Utility((xv, yv))), expected, rtol=1e-9, atol=1e-12)
    # the alias alone (the canonical name left out) fills the tied tensor too
    only_alias = [{k: v for k, v in s.items() if k != "inp.weight"} for s in states]
    est = hf.Influence(hf.ClassificationTask(model), members=hf.members.Checkpoints(only_alias, lrs=lrs)).fit((x, y))
    np.testing.assert_allclose(est.influence(hf.targets.Utility((xv, yv))), expected, rtol=1e-9, atol=1e-12)
    untied = dict(states[0], **{"back.weight": states[0]["inp.weight"] + 0.25})
    with pytest.raises(ValueError, match=r"'inp.weight' and 'back.weight' are one tied tensor .*\(max \|difference\| 0.25\)"):
        hf.Influence(hf.ClassificationTask(model), members=hf.members.Checkpoints([untied])).fit((x, y))


def test_hugging_face_weight_files_folders_and_shards_load_as_the_state_dict(blobs, val_blobs, tmp_path):
    save_file = pytest.importorskip("safetensors.torch").save_file
    x, y = blobs
    xv, yv, _ = val_blobs
    model = mlp()
    state = {n: p.detach() + 0.1 for n, p in mlp(seed=3).state_dict().items()}
    halves = [["0.weight", "0.bias"], ["2.weight", "2.bias"]]

    def folder(name, single, shard_name, write):
        d = tmp_path / name
        d.mkdir()
        if single:
            write(state, d / single)
        else:  # two shards and the index transformers writes with them
            files = [shard_name.format(i + 1) for i in range(2)]
            for keys, f in zip(halves, files):
                write({k: state[k] for k in keys}, d / f)
            index = {"metadata": {}, "weight_map": {k: f for keys, f in zip(halves, files) for k in keys}}
            (d / ("model.safetensors.index.json" if "safetensors" in shard_name else "pytorch_model.bin.index.json")).write_text(json.dumps(index))
        return d

    def safe(s, p):
        save_file(dict(s), str(p))

    def pt(s, p):
        torch.save(dict(s), p)

    paths = [
        folder("safe", "model.safetensors", None, safe),
        folder("safe_sharded", None, "model-0000{}-of-00002.safetensors", safe),
        folder("bin", "pytorch_model.bin", None, pt),
        folder("bin_sharded", None, "pytorch_model-0000{}-of-00002.bin", pt),
    ]
    paths += [paths[0] / "model.safetensors", paths[1] / "model.safetensors.index.json"]
    for p in paths:
        loaded = hf.members.load_checkpoint(p, model)
        assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state), p
    est = hf.Influence(hf.ClassificationTask(model), members=hf.members.Checkpoints(paths[:4], lrs=0.5)).fit((x, y))
    expected = tracin_by_hand(mlp, [state] * 4, [0.5] * 4, x, y, xv, yv)
    np.testing.assert_allclose(est.influence(hf.targets.Utility((xv, yv))), expected, rtol=1e-9, atol=1e-12)
    # a shard index naming a shard that is not there
    (paths[3] / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="shard 'pytorch_model-00002-of-00002.bin' named in"):
        hf.members.load_checkpoint(paths[3], model)


def test_folder_without_weights_names_the_files_it_expects(tmp_path):
    run = tmp_path / "out"
    (run / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds no model weights: expected one of \['model.safetensors'.*from_trainer"):
        hf.members.load_checkpoint(run, mlp())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.members.Checkpoints([tmp_path / "missing.pt"])


def test_checkpoint_tensor_of_another_shape_is_refused_not_broadcast(blobs):
    """A (1,)-shaped bias would broadcast in the forward pass and give numbers for another model."""
    x, y = blobs
    state = dict(mlp().state_dict(), **{"0.bias": torch.zeros(1, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"'0.bias' has shape \(1,\) but the model's is \(8,\)"):
        hf.Influence(hf.ClassificationTask(mlp()), members=hf.members.Checkpoints([state])).fit((x, y))


@pytest.mark.parametrize("bad", [float("nan"), -0.1, float("inf")])
def test_learning_rate_that_is_not_a_finite_non_negative_number_is_refused(bad):
    with pytest.raises(ValueError, match=rf"learning rate {bad} of checkpoint 1 is not a finite number >= 0"):
        hf.members.Checkpoints([mlp().state_dict()] * 2, lrs=[0.1, bad])


def test_a_view_of_a_recurrent_model_on_a_gpu_turns_cudnn_off_and_back(monkeypatch):
    """cuDNN has no recurrent backward in eval mode, so a view of a model with a GRU/LSTM on a GPU
    runs with cuDNN off (PyTorch's own kernels) and restores the setting after, also on an error.
    No GPU here: the predicate is checked on the module types, and the switch with the predicate forced."""
    from hessfree.members import views

    gru = nn.Sequential(nn.GRU(3, 4))
    assert not views._has_cuda_rnn(gru)  # on the CPU: nothing to do
    assert not views._has_cuda_rnn(nn.Sequential(nn.Linear(3, 4)))
    task = hf.ClassificationTask(nn.Linear(3, 2))
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    monkeypatch.setattr(views, "_has_cuda_rnn", lambda module: True)
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    with views.single_view(task, task.model, (x[:1], y[:1])):
        assert torch.backends.cudnn.enabled is False
    assert torch.backends.cudnn.enabled is True
    with pytest.raises(RuntimeError), views.single_view(task, task.model, (x[:1], y[:1])):
        raise RuntimeError("boom")
    assert torch.backends.cudnn.enabled is True
    monkeypatch.setattr(torch.backends.cudnn, "enabled", False)  # the user turned it off: left off
    with views.single_view(task, task.model, (x[:1], y[:1])):
        assert torch.backends.cudnn.enabled is False
    assert torch.backends.cudnn.enabled is False
