"""Per-example gradients against a plain autograd loop."""

import pytest
import torch
import torch.nn.functional as F
from conftest import EmbedBag, loop_grads, mlp
from torch import nn

import hessfree as hf


def flat(grads, names):
    b = next(iter(grads.values())).shape[0]
    return torch.cat([grads[k].reshape(b, -1) for k in names], 1)


@pytest.mark.parametrize(
    "params, expected",
    [
        (None, ["0.weight", "0.bias", "2.weight", "2.bias"]),
        ("all", ["0.weight", "0.bias", "2.weight", "2.bias"]),
        ("last", ["2.weight", "2.bias"]),
        ("0", ["0.weight", "0.bias"]),
        (["0.weight", "2.bias"], ["0.weight", "2.bias"]),
        (lambda name, p: name.endswith("bias"), ["0.bias", "2.bias"]),
    ],
)
def test_tuple_batches_match_loop_for_every_selection(blobs, params, expected):
    x, y = blobs
    model = mlp()
    task = hf.ClassificationTask(model)
    grads = hf.gradients.per_example_gradients(task, (x, y), params=params)
    assert list(grads) == expected
    ref = loop_grads(model, lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), len(x), expected)
    torch.testing.assert_close(flat(grads, expected), ref, rtol=1e-10, atol=1e-12)


def test_requires_grad_selection_gives_only_trainable(blobs):
    x, y = blobs
    model = mlp()
    model[0].weight.requires_grad_(False)
    grads = hf.gradients.per_example_gradients(hf.ClassificationTask(model), (x, y))
    assert list(grads) == ["0.bias", "2.weight", "2.bias"]


def test_sample_weights_scale_each_gradient(blobs):
    x, y = blobs
    w = torch.linspace(0.1, 2.0, len(x), dtype=torch.float64)
    model = mlp()
    names = [n for n, _ in model.named_parameters()]
    grads = hf.gradients.per_example_gradients(hf.ClassificationTask(model), (x, y, w))
    ref = loop_grads(model, lambda i: w[i] * F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), len(x), names)
    torch.testing.assert_close(flat(grads, names), ref, rtol=1e-10, atol=1e-12)


def test_dict_batches_with_embedding_and_padding():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (12, 7), generator=g)
    mask = torch.ones(12, 7)
    mask[::2, 4:] = 0  # padded tail on every other example
    labels = torch.randint(0, 3, (12,), generator=g)
    torch.manual_seed(0)
    model = EmbedBag().double()
    mask = mask.double()
    task = hf.ClassificationTask(model)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    grads = hf.gradients.per_example_gradients(task, batch)
    names = [n for n, _ in model.named_parameters()]
    ref = loop_grads(
        model, lambda i: F.cross_entropy(model(ids[i : i + 1], mask[i : i + 1]), labels[i : i + 1]), 12, names
    )
    torch.testing.assert_close(flat(grads, names), ref, rtol=1e-10, atol=1e-12)
    # a padded position's token id must not matter
    ids2 = ids.clone()
    ids2[::2, 4:] = 0
    grads2 = hf.gradients.per_example_gradients(task, {**batch, "input_ids": ids2})
    torch.testing.assert_close(flat(grads2, names), flat(grads, names))


def test_batchnorm_in_eval_mode_matches_loop(blobs):
    x, y = blobs
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    model.train()
    model(x)  # move the running statistics away from their defaults
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    ref = loop_grads(model, lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), len(x), names)
    model.train()  # hessfree evaluates in eval mode and restores the mode
    grads = hf.gradients.per_example_gradients(hf.ClassificationTask(model), (x, y))
    assert model.training
    torch.testing.assert_close(flat(grads, names), ref, rtol=1e-10, atol=1e-12)


def test_estimator_self_influence_and_pairwise_match_loop(blobs, val_blobs):
    x, y = blobs
    xv, yv, _ = val_blobs
    model = mlp()
    names = [n for n, _ in model.named_parameters()]
    est = hf.Influence(hf.ClassificationTask(model), batch_size=7).fit((x, y))
    g_train = loop_grads(model, lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), len(x), names)
    g_test = loop_grads(model, lambda i: F.cross_entropy(model(xv[i : i + 1]), yv[i : i + 1]), 5, names)
    torch.testing.assert_close(torch.from_numpy(est.self_influence()), g_train.pow(2).sum(1), rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.from_numpy(est.pairwise((xv[:5], yv[:5]))), g_test @ g_train.T, rtol=1e-9, atol=1e-12)


def test_uncached_equals_cached(blobs, val_blobs):
    x, y = blobs
    xv, yv, _ = val_blobs
    task = hf.ClassificationTask(mlp())
    target = hf.targets.Utility((xv, yv))
    cached = hf.Influence(task, batch_size=8).fit((x, y))
    streamed = hf.Influence(task, batch_size=8, max_cache_bytes=0).fit((x, y))
    assert not streamed._cache and cached._cache
    torch.testing.assert_close(torch.from_numpy(streamed.influence(target)), torch.from_numpy(cached.influence(target)))
    torch.testing.assert_close(torch.from_numpy(streamed.pairwise((xv, yv))), torch.from_numpy(cached.pairwise((xv, yv))))


def test_dataset_and_loader_inputs_equal_tensors(blobs):
    x, y = blobs
    task = hf.ClassificationTask(mlp())
    ref = hf.Influence(task).fit((x, y)).self_influence()
    ds = torch.utils.data.TensorDataset(x, y)
    for data in (ds, torch.utils.data.DataLoader(ds, batch_size=9, shuffle=False)):
        torch.testing.assert_close(torch.from_numpy(hf.Influence(task).fit(data).self_influence()), torch.from_numpy(ref))
