"""Data selection for fine-tuning a causal language model (TracIn-CP on LoRA gradients).

The method, in four resumable stages, each written under one work folder:

1. **Warm-up** (``warmup/``): a LoRA adapter is trained with AdamW on a random
   ``warmup_fraction`` of the pool for ``warmup_epochs`` epochs (linear
   learning-rate decay); after each epoch the adapter, the optimizer state and
   the mean learning rate of that epoch are saved (``ckpt{e}.pt``, written
   atomically). A killed warm-up restarts from the last saved epoch.
2. **Featurization** (``store/``): projected per-example gradients of the LoRA
   parameters (:class:`hessfree.projections.Factorized`, one Kronecker-factored
   projection per LoRA matrix) of every pool example at every checkpoint,
   written to a :class:`hessfree.store.GradientStore` (resumes after a kill).
3. **Targets**: projected gradients of a few validation examples of each target
   task, at each checkpoint, with the same matrices.
4. **Scores and selection**: TracIn-CP,

       score_t(i) = sum_c eta_c * mean_j sim(g_i^c, v_tj^c)

   with ``sim`` the dot product or the cosine, ``g_i^c`` the pool example's
   gradient and ``v_tj^c`` validation example j of task t, both at checkpoint
   c. Positive = a step on pool example i lowers the loss of task t's
   validation examples. With several tasks, ``combine="balanced"`` (the
   default) lets the tasks take turns, each adding its best example not yet
   taken, so each task gets an equal share of the ``fraction``;
   ``combine="max"`` (as LESS) ranks examples by their maximum over tasks and
   takes the top ``fraction``. An example's reported score is its maximum over
   tasks either way.

Everything is a pure function of the seed, the model and the data, so a rerun
(or a resumed run) selects the same examples.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from ._io import atomic_write_json, atomic_write_text, check_settings
from .gradients.adam import AdamDirections, adam_direction, adam_state  # noqa: F401  (public here too)
from .influence import Influence
from .llm import LanguageModelTask
from .llm_data import EncodedExamples, load_model, make_loader, read_jsonl  # noqa: F401  (public here too)
from .llm_warmup import adapter_state, add_lora, check_inputs, checkpoint_states, warmup  # noqa: F401  (public here too)
from .members import Checkpoints
from .projections import Factorized
from .selection_config import COMBINES, SIMILARITIES, Selection, SelectionConfig  # noqa: F401  (public here too)


class AdamPreconditioned(Influence):
    """An estimator whose training features are projected per-example Adam update
    directions (one Adam state per checkpoint member); queries stay plain gradients.
    The same as ``Influence(*args, train_map=AdamDirections(states), **kwargs)``.

    Args:
        states: per member, :func:`adam_state` of its checkpoint.
        *args, **kwargs: as :class:`hessfree.Influence` (needs a projection).
    """

    def __init__(self, states: Sequence[dict[str, Any]], *args: Any, **kwargs: Any):
        super().__init__(*args, train_map=AdamDirections(states), **kwargs)
        if not self._projections:
            raise ValueError("AdamPreconditioned needs projection=hf.projections.Factorized(k) or Dense(k)")
        self.states = list(states)


# ---- stages 2-4: features, targets, scores -------------------------------------------------------


def tracin_scores(
    est: Influence,
    targets: dict[str, DataLoader],
    similarity: str = "cosine",
    val_estimator: Callable[[DataLoader], Influence] | None = None,
) -> dict[str, np.ndarray]:
    """TracIn-CP score of every training row of a fitted ``est`` for each target task.

    Args:
        est: fitted on the pool, with checkpoint members (weights = learning rates).
        targets: task name -> loader of its validation examples.
        similarity: ``"dot"``: ``sum_c eta_c mean_j g_i . v_j``; ``"cosine"``: the
            same with each product divided by ``|g_i| |v_j|``.
        val_estimator: builds an estimator like ``est`` fitted on a validation
            loader (needed for the validation norms with ``"cosine"``).

    Returns:
        task -> ``(n_pool,)`` scores (positive = helps the task).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    weights = est.member_weights
    out = {}
    if similarity == "cosine":
        train_norm = np.sqrt(est.self_influence(reduce=None) / weights[:, None])  # (C, n)
    for name, loader in targets.items():
        pair = est.pairwise(loader, reduce=None)  # (C, n_val, n), rows already times eta_c
        if similarity == "cosine":
            if val_estimator is None:
                raise ValueError("similarity='cosine' needs val_estimator to compute the validation norms")
            val_norm = np.sqrt(val_estimator(loader).self_influence(reduce=None) / weights[:, None])  # (C, n_val)
            denom = val_norm[:, :, None] * train_norm[:, None, :]
            pair = pair / np.maximum(denom, 1e-30)
        out[name] = pair.mean(axis=1).sum(axis=0)
    return out


def top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the ``ceil(fraction * n)`` highest scores, best first (ties: lower index first)."""
    k = max(1, math.ceil(fraction * len(scores)))
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k]


def balanced_top(task_scores: dict[str, np.ndarray], fraction: float) -> np.ndarray:
    """Indices of ``ceil(fraction * n)`` examples shared equally between tasks, in pick order.

    Tasks take turns in name order; each adds its highest-scoring example not
    already selected (ties: lower index first).
    """
    names = sorted(task_scores)
    n = len(task_scores[names[0]])
    k = max(1, math.ceil(fraction * n))
    orders = {t: top_fraction(task_scores[t], 1.0) for t in names}
    pos = dict.fromkeys(names, 0)
    taken = np.zeros(n, dtype=bool)
    out: list[int] = []
    while len(out) < k:
        for t in names:
            if len(out) == k:
                break
            order = orders[t]
            while taken[order[pos[t]]]:
                pos[t] += 1
            i = int(order[pos[t]])
            taken[i] = True
            out.append(i)
    return np.asarray(out, dtype=np.int64)


def select(
    model: nn.Module,
    tokenizer: Any,
    pool: Sequence[dict[str, Any]],
    targets: Sequence[dict[str, Any]],
    workdir: str | os.PathLike,
    config: SelectionConfig | None = None,
    progress: bool | None = None,
) -> Selection:
    """Select the pool rows whose LoRA gradients best align with the target tasks.

    Args:
        model: a Hugging Face causal LM (a LoRA adapter is added when it has none;
            it is trained in place by the warm-up).
        tokenizer: its tokenizer.
        pool: rows with ``prompt`` and ``response`` strings.
        targets: validation rows with ``prompt``, ``response`` and ``task``.
        workdir: folder for checkpoints, the gradient store and ``selection.json``;
            rerunning with the same folder resumes (or reuses) every stage.
        config: :class:`SelectionConfig` (defaults otherwise).

    Returns:
        a :class:`Selection`.
    """
    import time

    config = config or SelectionConfig()
    config.validate()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "config.json"
    cfg = asdict(config)
    if cfg_path.exists():
        check_settings(workdir, json.loads(cfg_path.read_text()), cfg, fix="use a new folder")
    for i, r in enumerate(targets):
        if not isinstance(r.get("task"), str):
            raise ValueError(f"target row {i} has no string 'task' field; every target row needs prompt, response and task")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model = add_lora(model, config)
    pool_ex = EncodedExamples(tokenizer, pool, config.max_length)
    check_inputs(model, pool_ex.items, workdir)  # before any stale checkpoint could be reused
    if not cfg_path.exists():  # the folder is bound to these settings once its inputs are accepted
        atomic_write_text(cfg_path, json.dumps(cfg, indent=1, sort_keys=True))
    paths, lrs = warmup(model, pool_ex, config, workdir / "warmup", pad_id, progress)
    timings["warmup_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    task = LanguageModelTask(model, reduction=config.reduction)
    members = Checkpoints(checkpoint_states(model, paths), lrs=lrs)
    projection = Factorized(config.projection_dim, seed=config.seed)

    def estimator(store: Path | None = None) -> Influence:
        return Influence(task, members=members, projection=projection, batch_size=config.batch_size, store=store, progress=progress)

    model.eval()
    loader = make_loader(pool_ex, config.batch_size, pad_id)
    if config.optimizer_aware:
        pre = [adam_state(model, p) for p in paths]
        est = AdamPreconditioned(pre, task, members=members, projection=projection, batch_size=config.batch_size,
                                 store=workdir / "store-adam", progress=progress).fit(loader)
    else:
        est = estimator(workdir / "store").fit(loader)
    timings["featurize_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    by_task: dict[str, list] = {}
    for r in targets:
        by_task.setdefault(r["task"], []).append(r)
    loaders = {t: make_loader(EncodedExamples(tokenizer, rows, config.max_length), config.batch_size, pad_id) for t, rows in sorted(by_task.items())}
    task_scores = tracin_scores(est, loaders, config.similarity, lambda loader: estimator().fit(loader))
    scores = np.max(np.stack(list(task_scores.values())), axis=0)
    indices = top_fraction(scores, config.fraction) if config.combine == "max" else balanced_top(task_scores, config.fraction)
    timings["score_s"] = time.perf_counter() - t0
    result = Selection(indices, scores, task_scores, [str(p) for p in paths], lrs, timings)
    summary = {
        "n_pool": len(pool),
        "n_selected": int(len(indices)),
        "tasks": {t: len(r) for t, r in sorted(by_task.items())},
        "indices": indices.tolist(),
        "lrs": lrs,
        "timings": timings,
        "feature_dim": est.feature_dim,
    }
    atomic_write_json(workdir / "selection.json", summary, indent=1)
    return result


# ---- files in, files out (the ``hessfree select`` command) ------------------------------------------


def select_files(
    pool: str | os.PathLike,
    target: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    config: SelectionConfig | None = None,
    workdir: str | os.PathLike | None = None,
    gguf_file: str | None = None,
    progress: bool | None = None,
) -> Selection:
    """:func:`select` on JSON-lines files; writes the selected pool rows to ``out``.

    Each output row is the pool row with two fields added: ``hessfree_index``
    (its row number in the pool) and ``hessfree_score`` (its maximum score over
    the tasks), in selection order: best first for ``combine="max"``, the order
    the tasks took turns in for ``"balanced"`` (so the scores need not decrease). ``workdir`` (default ``<out>.work``) holds checkpoints and the
    gradient store; rerunning the same command resumes from it.
    """
    pool_rows = read_jsonl(pool)
    target_rows = read_jsonl(target, need=("prompt", "response", "task"))
    lm, tokenizer = load_model(model, gguf_file)
    out = Path(out)
    workdir = Path(workdir) if workdir is not None else out.with_name(out.name + ".work")
    result = select(lm, tokenizer, pool_rows, target_rows, workdir, config, progress)
    lines = (json.dumps({**pool_rows[int(i)], "hessfree_index": int(i), "hessfree_score": float(result.scores[i])}) + "\n"
             for i in result.indices)  # fmt: skip
    atomic_write_text(out, "".join(lines))
    return result
