"""Peer attribution methods for the LDS study (benchmarks/lds.py): TRAK
(``traker``), Kronfluence EK-FAC and dattri, each returning train-to-test
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
from _peers import kronfluence_ce_task
from torch import nn


def trak_pairwise(
    make_model: Callable[[], nn.Module],
    models: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    proj_dim: int,
    batch_size: int = 256,
) -> np.ndarray:
    """TRAK (Park et al., 2023, ``traker``) scores of every training example for
    every query, ensembled over ``models`` (independently trained), with the
    CPU ``BasicProjector`` (Rademacher, ``proj_dim`` dimensions, fp32, one
    block: the matrix is drawn once and kept). TRAK's output function for
    ``image_classification`` is the correct-class margin; its scores are
    positive when the example raises the query's margin. Returns ``(n_test, n_train)``."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    n = len(y)
    n_params = sum(p.numel() for p in models[0].parameters())
    with tempfile.TemporaryDirectory() as tmp:
        projector = BasicProjector(
            grad_dim=n_params, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.rademacher, device="cpu",
            dtype=torch.float32, block_size=proj_dim,
        )  # fmt: skip
        traker = TRAKer(
            model=make_model().eval(), task="image_classification", train_set_size=n, save_dir=tmp, device="cpu",
            projector=projector, proj_dim=proj_dim, use_half_precision=False, logging_level=40,
        )  # fmt: skip
        for mid, m in enumerate(models):
            traker.load_checkpoint(m.state_dict(), model_id=mid)
            for i in range(0, n, batch_size):
                traker.featurize(batch=(x[i : i + batch_size], y[i : i + batch_size]),
                                 num_samples=len(y[i : i + batch_size]))  # fmt: skip
        traker.finalize_features()
        # traker 0.3.2: finalize_features frees the one-block matrix and project() only redraws it when the
        # model id changes, so with one model scoring fails ('no attribute proj_matrix'); force the redraw.
        projector.model_id = -1
        for mid, m in enumerate(models):
            traker.start_scoring_checkpoint(exp_name="lds", checkpoint=m.state_dict(), model_id=mid,
                                            num_targets=len(yq))  # fmt: skip
            for i in range(0, len(yq), batch_size):
                traker.score(batch=(xq[i : i + batch_size], yq[i : i + batch_size]),
                             num_samples=len(yq[i : i + batch_size]))  # fmt: skip
        scores = np.asarray(traker.finalize_scores(exp_name="lds"), dtype=float)  # (n_train, n_targets)
    return scores.T.copy()


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
