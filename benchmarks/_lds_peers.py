"""Peer attribution methods for the LDS study (benchmarks/lds.py): TRAK
(``traker``, :func:`_peers.trak_scores`, re-exported), Kronfluence EK-FAC and dattri, each returning train-to-test
scores ``(n_test, n_train)`` for a classifier trained with cross-entropy, with
hessfree's sign convention: positive = the training example helps the test
example (raises its margin / lowers its loss).

These are benchmark-only dependencies; see the install lines in lds.py.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from _peers import kronfluence_ce_task, trak_scores  # noqa: F401  (trak_scores: re-exported for lds.py)
from torch import nn


def kronfluence_pairwise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor,
                         yq: torch.Tensor) -> np.ndarray:
    """Kronfluence (Grosse et al., 2023) EK-FAC influence of every training
    example on every query's cross-entropy loss, on the final model (all
    ``nn.Linear`` / ``nn.Conv2d`` modules, Kronfluence's default damping), CPU.
    Kronfluence's pairwise score is positive when up-weighting the training
    example lowers the query loss (helpful), the same sign as hessfree.
    Returns ``(n_test, n_train)``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    task = kronfluence_ce_task()
    m = prepare_model(copy.deepcopy(model).eval(), task)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("lds", m, task, cpu=True, disable_tqdm=True, output_dir=tmp, disable_model_save=True)
        train = torch.utils.data.TensorDataset(x, y)
        analyzer.fit_all_factors("ekfac", train, per_device_batch_size=256, factor_args=FactorArguments(strategy="ekfac"),
                                 overwrite_output_dir=True)  # fmt: skip
        analyzer.compute_pairwise_scores("pw", "ekfac", query_dataset=torch.utils.data.TensorDataset(xq, yq), train_dataset=train,
                                         per_device_query_batch_size=len(yq), per_device_train_batch_size=256,
                                         score_args=ScoreArguments(), overwrite_output_dir=True)  # fmt: skip
        scores = analyzer.load_pairwise_scores("pw")["all_modules"]
    return scores.detach().double().numpy()


def dattri_trak(make_model: Callable[[], nn.Module], models: Sequence[nn.Module], x, y, xq, yq,
                proj_dim: int) -> np.ndarray:
    """dattri's ``TRAKAttributor`` (its own implementation of TRAK) over
    ``models`` (their state dicts as dattri "checkpoints"), ``proj_dim``
    dimensions, output function the margin ``log(p / (1 - p))`` of the correct
    class as in dattri's documentation (computed from the logits, so it stays
    finite when ``p`` rounds to 1 in float32); positive scores help.
    Returns ``(n_test, n_train)``."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = make_model().eval()

    def log_p(params, batch):  # log-probability of the correct class of one example
        xb, yb = batch
        logits = torch.func.functional_call(model, params, xb.unsqueeze(0))
        return -F.cross_entropy(logits, yb.unsqueeze(0))

    def margin(params, batch):  # log(p / (1 - p)) = z_y - logsumexp(z_other), finite when p rounds to 1
        xb, yb = batch
        logits = torch.func.functional_call(model, params, xb.unsqueeze(0))
        mine = torch.arange(logits.shape[-1]) == yb  # one-hot of the label, without data-dependent ops (vmap)
        correct = (logits * mine).sum(-1)
        return (correct - torch.logsumexp(logits.masked_fill(mine, -torch.inf), dim=-1)).sum()

    def correct_prob(params, batch):
        return torch.exp(log_p(params, batch))

    task = AttributionTask(loss_func=margin, model=model, checkpoints=[m.state_dict() for m in models])
    attributor = TRAKAttributor(task=task, correct_probability_func=correct_prob, device="cpu",
                                projector_kwargs={"proj_dim": proj_dim, "device": "cpu"})
    train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
    test_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xq, yq), batch_size=len(yq))
    attributor.cache(train_loader)
    scores = attributor.attribute(test_loader)  # (n_train, n_test)
    return np.asarray(scores.detach(), dtype=float).T.copy()
