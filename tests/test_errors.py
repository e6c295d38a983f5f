"""Bad input gets an error that names the value and the fix."""

import pytest
import torch
from conftest import mlp

import hessfree as hf


def test_train_label_length_mismatch(blobs):
    x, y = blobs
    with pytest.raises(ValueError, match=r"length mismatch: train\[0\] has 40 rows, train\[1\] has 39 rows"):
        hf.Influence(hf.ClassificationTask(mlp())).fit((x, y[:-1]))


def test_fairness_target_with_one_group(val_blobs):
    xv, yv, _ = val_blobs
    with pytest.raises(ValueError, match=r"at least two groups; groups has only \[0\]"):
        hf.targets.DemographicParity((xv, yv), groups=torch.zeros(len(xv), dtype=torch.long))


def test_fairness_target_with_missing_groups(val_blobs):
    xv, yv, groups = val_blobs
    with pytest.raises(ValueError, match="groups= is required"):
        hf.targets.DemographicParity((xv, yv), groups=None)
    with pytest.raises(ValueError, match=r"groups has shape \(29,\) but the data has 30 examples"):
        hf.targets.EqualOpportunity((xv, yv), groups=groups[:-1])
    with pytest.raises(ValueError, match="missing values"):
        hf.targets.DemographicParity((xv, yv), groups=torch.where(groups == 1, float("nan"), 0.0))


def test_equal_opportunity_group_without_positives(blobs, val_blobs):
    x, y = blobs
    xv, yv, groups = val_blobs
    yv = yv.clone()
    yv[groups == 1] = 0
    est = hf.Influence(hf.ClassificationTask(mlp())).fit((x, y))
    with pytest.raises(ValueError, match="group 1 has no held-out example with label 1"):
        est.influence(hf.targets.EqualOpportunity((xv, yv), groups=groups))


def test_empty_target_set(val_blobs):
    xv, yv, _ = val_blobs
    with pytest.raises(ValueError, match="target set is empty"):
        hf.targets.Utility((xv[:0], yv[:0]))


def test_no_trainable_parameters(blobs):
    x, y = blobs
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters selected by params=None.*requires_grad"):
        hf.Influence(hf.ClassificationTask(model)).fit((x, y))
    with pytest.raises(ValueError, match=r"no parameters selected by params='head'.*Parameters: \[0.weight"):
        hf.Influence(hf.ClassificationTask(model), params="head").fit((x, y))


def test_nan_gradient_names_the_example(blobs, val_blobs):
    x, y = blobs
    x = x.clone()
    x[17, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="training example 17"):
        hf.Influence(hf.ClassificationTask(mlp()), batch_size=8).fit((x, y))
    x[17, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="training example 17"):
        hf.Influence(hf.ClassificationTask(mlp()), batch_size=8).fit((x, y))
    xv, yv = val_blobs[0].clone(), val_blobs[1]
    xv[5, 0] = float("nan")
    est = hf.Influence(hf.ClassificationTask(mlp()), batch_size=8).fit(blobs)
    with pytest.raises(FloatingPointError, match="utility target gradient is not finite .*target example 5 has a NaN"):
        est.influence(hf.targets.Utility((xv, yv), batch_size=4))


def test_shuffled_loader_is_refused(blobs):
    x, y = blobs
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        hf.Influence(hf.ClassificationTask(mlp())).fit(loader)


def test_queries_before_fit_and_bad_reduce(blobs):
    x, y = blobs
    est = hf.Influence(hf.ClassificationTask(mlp()))
    with pytest.raises(hf.NotFittedError, match="fit"):
        est.self_influence()
    est.fit((x, y))
    with pytest.raises(ValueError, match="reduce must be 'sum', 'mean' or None, got 'max'"):
        est.self_influence(reduce="max")


def test_loss_must_be_per_example(blobs):
    x, y = blobs
    task = hf.Task(mlp(), loss_fn=lambda out, labels: torch.nn.functional.cross_entropy(out, labels))
    with pytest.raises(ValueError, match="one value per example"):
        hf.Influence(task).fit((x, y))


def test_checkpoint_that_does_not_match(blobs):
    x, y = blobs
    bad = {"0.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="does not match the model: missing"):
        hf.Influence(hf.ClassificationTask(mlp()), members=hf.members.Checkpoints([bad])).fit((x, y))


def test_hessian_comparator_with_projection_is_refused(blobs):
    with pytest.raises(ValueError, match="needs exact per-example gradients; use it with projection=None"):
        hf.Influence(hf.ClassificationTask(mlp()), hessian="exact", projection=hf.projections.Dense(8))
