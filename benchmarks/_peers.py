"""Peer methods for the noisy-label study: Captum TracInCP, TRAK and Kronfluence
EK-FAC self-influence, each returning a suspicion score ``(n_train,)`` (higher =
more likely mislabelled) for a classifier trained with cross-entropy.

These are benchmark-only dependencies (the ``bench`` extra). Kronfluence must be
installed without its dependencies, or pip replaces the CPU build of torch:

    pip install --no-deps kronfluence
    pip install accelerate einops einconv opt-einsum safetensors tqdm

Also here: :func:`measure`, the per-method wall time and peak memory.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _release_free_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _measure_here(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
    except OSError:
        before = None
    t0 = time.perf_counter()
    out = fn()
    sec = time.perf_counter() - t0
    peak = float("nan") if before is None else max(0, _status_kib("VmHWM") - before) / 1024.0
    return out, sec, peak


def _child(fn, conn) -> None:
    try:
        conn.send(("ok", _measure_here(fn)))
    except BaseException as exc:  # report any failure to the parent, which re-raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def measure(fn: Callable[[], Any], isolate: bool = True) -> tuple[Any, float, float]:
    """Run ``fn()``; return ``(result, wall seconds, peak extra memory in MiB)``.

    With ``isolate`` (default) ``fn`` runs in a forked child process, so every
    method starts from the same state (the parent's, after training) and none
    inherits memory that an earlier method freed. In the process that runs
    ``fn``: free heap is handed back to the system (``malloc_trim``), the peak
    resident set is reset (``5`` written to ``/proc/self/clear_refs``), and the
    peak extra memory is the peak resident set during ``fn`` (``VmHWM``) minus
    the resident set just before it (``VmRSS``). It counts every allocation
    (torch tensors, numpy, Python objects, libraries imported on first use),
    not the memory the process already held. Linux only; ``nan`` elsewhere.
    Seconds are the wall time of ``fn`` alone (not the fork).
    """
    if not isolate:
        return _measure_here(fn)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, child))
    proc.start()
    child.close()
    status, payload = parent.recv()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"measured method failed in its child process: {payload}")
    return payload


def captum_tracincp(
    make_model: Callable[[], nn.Module], checkpoints: list[dict], lrs: list[float], x: torch.Tensor, y: torch.Tensor
) -> np.ndarray:
    """Captum ``TracInCP`` self-influence over the saved checkpoints (all layers,
    per-example gradients by Captum's batched hooks), each checkpoint weighted by
    its learning rate. Checkpoints are written to a temporary folder, since
    Captum loads them from files."""
    from captum.influence import TracInCP

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (state, lr) in enumerate(zip(checkpoints, lrs)):
            p = str(Path(tmp) / f"ckpt{i}.pt")
            torch.save({"state": state, "lr": lr}, p)
            paths.append(p)

        def load(model: nn.Module, path: str) -> float:
            blob = torch.load(path, weights_only=True)
            model.load_state_dict(blob["state"])
            return float(blob["lr"])

        model = make_model()
        tracin = TracInCP(
            model,
            torch.utils.data.TensorDataset(x, y),
            paths,
            checkpoints_load_func=load,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=256,
            sample_wise_grads_per_batch=True,
        )
        return tracin.self_influence(show_progress=False).detach().numpy()


def trak_scores(
    make_model: Callable[[], nn.Module],
    models: list[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    proj_dim: int,
    batch_size: int = 256,
    lambda_reg: float = 0.0,
) -> np.ndarray:
    """TRAK (Park et al., 2023, ``traker``) scores ``(n_train, n_query)`` of every
    training example for every query, ensembled over ``models`` (independently
    trained), with the CPU ``BasicProjector`` (Rademacher, ``proj_dim``
    dimensions, fp32, one block: the projection matrix is drawn once and kept,
    ``n_params x proj_dim`` floats; in smaller blocks TRAK redraws every block
    for every batch, many times slower on a CPU). TRAK's output function for
    ``image_classification`` is the correct-class margin; its scores are
    positive when the example raises the query's margin. ``lambda_reg``: TRAK's ridge
    term added to ``X^T X`` (its default 0)."""
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
            projector=projector, proj_dim=proj_dim, use_half_precision=False, logging_level=40, lambda_reg=lambda_reg,
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
            traker.start_scoring_checkpoint(exp_name="scores", checkpoint=m.state_dict(), model_id=mid,
                                            num_targets=len(yq))  # fmt: skip
            for i in range(0, len(yq), batch_size):
                traker.score(batch=(xq[i : i + batch_size], yq[i : i + batch_size]),
                             num_samples=len(yq[i : i + batch_size]))  # fmt: skip
        return np.asarray(traker.finalize_scores(exp_name="scores"), dtype=float)


def trak_self(
    make_model: Callable[[], nn.Module],
    fit: Callable[[int], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    n_models: int = 5,
    proj_dim: int = 512,
    first: nn.Module | None = None,
) -> np.ndarray:
    """TRAK self-influence (diagonal of the train-on-train TRAK score matrix of
    :func:`trak_scores`), averaged over ``n_models`` independently trained
    models (``fit(seed)`` trains one; ``first``, if given, is used as model 0,
    so ``n_models - 1`` are trained here and that time counts)."""
    models = [first if first is not None else fit(0)] + [fit(1000 + s) for s in range(1, n_models)]
    return np.diag(trak_scores(make_model, models, x, y, x, y, proj_dim)).copy()


def kronfluence_ce_task():
    """A Kronfluence ``Task`` for ``(x, y)`` batches: summed cross-entropy as the training loss
    (with labels sampled from the model for the Fisher when ``sample=True``) and as the measurement."""
    from kronfluence.task import Task

    class _CE(Task):
        def compute_train_loss(self, batch, model, sample=False):
            xb, yb = batch
            logits = model(xb)
            if not sample:
                return F.cross_entropy(logits, yb, reduction="sum")
            with torch.no_grad():
                sampled = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, sampled, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    return _CE()


def kronfluence_ekfac(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Kronfluence EK-FAC self-influence of the final model (all ``nn.Linear``
    modules, default damping), on the CPU. Kronfluence works on a copy of the
    model (its hooks are not left on the caller's model)."""
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    task = kronfluence_ce_task()
    m = prepare_model(copy.deepcopy(model).eval(), task)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("noisy", m, task, cpu=True, disable_tqdm=True, output_dir=tmp, disable_model_save=True)
        data = torch.utils.data.TensorDataset(x, y)
        analyzer.fit_all_factors("ekfac", data, per_device_batch_size=256, factor_args=FactorArguments(strategy="ekfac"),
                                 overwrite_output_dir=True)  # fmt: skip
        analyzer.compute_self_scores("self", "ekfac", data, per_device_train_batch_size=256,
                                     score_args=ScoreArguments(), overwrite_output_dir=True)  # fmt: skip
        scores = analyzer.load_self_scores("self")["all_modules"]
    return scores.detach().numpy().astype(float)
