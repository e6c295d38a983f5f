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
   validation examples. With several tasks an example's score is its maximum
   over tasks; the top ``fraction`` of the pool is selected.

Everything is a pure function of the seed, the model and the data, so a rerun
(or a resumed run) selects the same examples.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._io import atomic_save, atomic_write_json, atomic_write_text, check_settings, iter_jsonl
from ._progress import progress_bar
from .influence import Influence
from .llm import LanguageModelTask, collate, encode
from .members import Checkpoints
from .projections import Factorized

SIMILARITIES = ("cosine", "dot")
COMBINES = ("max", "balanced")


@dataclass
class SelectionConfig:
    """Settings of :func:`select` (saved as ``config.json`` in the work folder).

    Attributes:
        fraction: share of the pool to select, in (0, 1].
        warmup_fraction: share of the pool the LoRA warm-up trains on.
        warmup_epochs: warm-up epochs = number of checkpoints (TracIn-CP members).
        lr: peak AdamW learning rate of the warm-up (decays linearly to 0).
        weight_decay: AdamW weight decay.
        lora_r, lora_alpha, lora_targets: the LoRA adapter added when the model has none.
        projection_dim: total projected dimension ``k`` (over all LoRA matrices).
        similarity: ``"cosine"`` (default, as LESS) or ``"dot"``.
        combine: how several target tasks share the budget: ``"balanced"``
            (default: tasks take turns, in name order, each adding its best
            not yet selected example, so each gets an equal share) or
            ``"max"`` (LESS: rank by each example's maximum score over tasks;
            a task whose gradients align more strongly can take every slot,
            which on the study in docs/llm_selection.md left the other task
            worse than random selection).
        optimizer_aware: score the Adam update direction of each pool example
            instead of its gradient (LESS): at checkpoint c with Adam moments
            ``m, v`` after ``t`` steps, ``u = m_hat / (sqrt(v_hat) + eps)`` with
            ``m_hat = (b1 m + (1 - b1) g) / (1 - b1^(t+1))`` and likewise ``v_hat``
            with ``g^2``. Needs full per-example LoRA gradients (``vmap``) before
            projection; validation examples keep plain gradients.
        batch_size: examples per batch (warm-up steps and featurization).
        max_length: tokens per example (responses are truncated, never prompts).
        reduction: per-example loss, ``"mean"`` (nats per response token) or ``"sum"``.
        seed: seeds the warm-up subset, its order, the adapter and the projection.
    """

    fraction: float = 0.05
    warmup_fraction: float = 0.05
    warmup_epochs: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    projection_dim: int = 8192
    similarity: str = "cosine"
    combine: str = "balanced"
    optimizer_aware: bool = False
    batch_size: int = 8
    max_length: int = 256
    reduction: str = "mean"
    seed: int = 0

    def validate(self) -> None:
        for name in ("fraction", "warmup_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValueError(f"{name} must be in (0, 1], got {v!r} (e.g. 0.05 for 5%)")
        for name in ("warmup_epochs", "lora_r", "projection_dim", "batch_size", "max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


@dataclass
class Selection:
    """Result of :func:`select`.

    Attributes:
        indices: ``(n_selected,)`` pool row numbers, best first.
        scores: ``(n_pool,)`` selection score of every pool row (max over tasks).
        task_scores: task name -> ``(n_pool,)`` TracIn-CP score (units: summed
            learning rate times similarity; positive = helps that task).
        checkpoints: paths of the warm-up checkpoints.
        lrs: their learning rates (the TracIn-CP weights).
        timings: seconds per stage.
    """

    indices: np.ndarray
    scores: np.ndarray
    task_scores: dict[str, np.ndarray]
    checkpoints: list[str]
    lrs: list[float]
    timings: dict[str, float]


# ---- data ----------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike, need: Sequence[str] = ("prompt", "response")) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file, each checked to hold the string fields ``need``."""
    rows = []
    for line_no, row in iter_jsonl(path):
        missing = [k for k in need if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{line_no} has no string field(s) {missing}; each row needs {list(need)}")
        rows.append(row)
    return rows


class EncodedExamples(Dataset):
    """Prompt/response rows tokenised with :func:`hessfree.llm.encode` (1-D tensors)."""

    def __init__(self, tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int = 256):
        self.items = [encode(tokenizer, r["prompt"], r["response"], max_length=max_length) for r in rows]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def make_loader(examples: Dataset, batch_size: int, pad_id: int = 0) -> DataLoader:
    """A sequential loader that right-pads each batch to its own longest example."""
    return DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=lambda b: collate(b, pad_id=pad_id))


# ---- the adapter -----------------------------------------------------------------------------


def add_lora(model: nn.Module, config: SelectionConfig) -> nn.Module:
    """``model`` with a fresh LoRA adapter (seeded), or ``model`` itself when it has one."""
    if any("lora_" in n for n, _ in model.named_parameters()):
        return model
    try:
        import peft
    except ImportError as e:
        raise ImportError("selection needs peft: pip install 'hessfree[llm]'") from e
    torch.manual_seed(config.seed)
    lora = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=list(config.lora_targets), lora_dropout=0.0)
    return peft.get_peft_model(model, lora)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters, detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- stage 1: warm-up ------------------------------------------------------------------------


def warmup(
    model: nn.Module,
    examples: Dataset,
    config: SelectionConfig,
    folder: str | os.PathLike,
    pad_id: int = 0,
    progress: bool | None = None,
) -> tuple[list[Path], list[float]]:
    """Train the LoRA adapter on a random ``warmup_fraction`` of ``examples``.

    Returns the checkpoint paths (one per epoch) and the mean learning rate of
    each epoch. Resumes from the last complete epoch found in ``folder``; the
    model's adapter ends at the last checkpoint.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(examples)
    gen = torch.Generator().manual_seed(config.seed)
    n_warm = max(1, math.ceil(config.warmup_fraction * n))
    subset = torch.randperm(n, generator=gen)[:n_warm].tolist()
    steps_per_epoch = math.ceil(n_warm / config.batch_size)
    total = steps_per_epoch * config.warmup_epochs
    task = LanguageModelTask(model, reduction=config.reduction)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; add a LoRA adapter (hf.selection.add_lora)")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    paths = [folder / f"ckpt{e}.pt" for e in range(config.warmup_epochs)]
    lrs: list[float] = []
    named = {n_: p for n_, p in model.named_parameters() if p.requires_grad}
    was = model.training
    model.train()
    bar = progress_bar(total, "LoRA warm-up", progress)
    try:
        for e, path in enumerate(paths):
            if path.exists():  # resume: adapter, optimizer and schedule as saved
                saved = torch.load(path, map_location="cpu", weights_only=True)
                with torch.no_grad():
                    for k, v in saved["adapter"].items():
                        named[k].copy_(v)
                opt.load_state_dict(saved["optimizer"])
                sched.load_state_dict(saved["scheduler"])
                lrs.append(float(saved["lr"]))
                bar.update(steps_per_epoch)
                continue
            order = torch.randperm(n_warm, generator=torch.Generator().manual_seed(config.seed * 1000 + e + 1))
            epoch_lrs = []
            for s in range(0, n_warm, config.batch_size):
                batch = collate([examples[subset[int(j)]] for j in order[s : s + config.batch_size]], pad_id=pad_id)
                epoch_lrs.append(opt.param_groups[0]["lr"])
                loss = task.per_example_loss(model, batch).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
            lr = float(np.mean(epoch_lrs))
            state = {"adapter": adapter_state(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "lr": lr}
            atomic_save(path, state)
            lrs.append(lr)
    finally:
        bar.close()
        model.train(was)
    return paths, lrs


def checkpoint_states(model: nn.Module, paths: Sequence[Path]) -> list[dict[str, torch.Tensor]]:
    """Full state dicts (the base weights shared, not copied) with each checkpoint's adapter.

    Built from ``named_parameters`` and ``named_buffers`` (not ``state_dict``), so tied
    weights such as an LM head that shares the embedding appear once."""
    base = {k: v.detach() for k, v in model.named_parameters()}
    base.update({k: v.detach() for k, v in model.named_buffers()})
    out = []
    for p in paths:
        adapter = torch.load(p, map_location="cpu", weights_only=True)["adapter"]
        out.append({**base, **adapter})
    return out


# ---- optional: the Adam update direction of each pool example (LESS) ------------------------------


def adam_state(model: nn.Module, path: Path) -> dict[str, Any]:
    """The AdamW moments saved with a warm-up checkpoint, keyed by parameter name:
    ``{"m": {name: tensor}, "v": {...}, "step": {name: int}, "betas": (b1, b2), "eps": eps}``."""
    saved = torch.load(path, map_location="cpu", weights_only=True)["optimizer"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    group = saved["param_groups"][0]
    out: dict[str, Any] = {"m": {}, "v": {}, "step": {}, "betas": tuple(group["betas"]), "eps": float(group["eps"])}
    for idx, name in zip(group["params"], names):
        st = saved["state"][idx]
        out["m"][name], out["v"][name], out["step"][name] = st["exp_avg"], st["exp_avg_sq"], int(st["step"])
    return out


def adam_direction(grads: dict[str, torch.Tensor], state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per-example Adam update directions ``{name: (B, *shape)}`` from per-example gradients
    (see :class:`SelectionConfig` ``optimizer_aware``)."""
    b1, b2 = state["betas"]
    out = {}
    for n, g in grads.items():
        t = state["step"][n] + 1
        m = (b1 * state["m"][n].to(g) + (1 - b1) * g) / (1 - b1**t)
        v = (b2 * state["v"][n].to(g) + (1 - b2) * g * g) / (1 - b2**t)
        out[n] = m / (v.sqrt() + state["eps"])
    return out


class AdamDirections:
    """A training feature map: projected per-example Adam update directions, one
    Adam state per member (``Influence(..., train_map=AdamDirections(states))``;
    queries stay plain gradients). LESS (Xia et al., 2024) scores with these.

    Args:
        states: per member, :func:`adam_state` of its checkpoint.
    """

    def __init__(self, states: Sequence[dict[str, Any]]):
        self.states = list(states)

    def __call__(self, feature_map, view, batch) -> torch.Tensor:
        grads = feature_map.per_example_grads(view, batch)
        return feature_map.project_grads(adam_direction(grads, self.states[view.member_index]))

    def __repr__(self) -> str:
        return f"AdamDirections(members={len(self.states)})"


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
    else:
        atomic_write_text(cfg_path, json.dumps(cfg, indent=1, sort_keys=True))
    for i, r in enumerate(targets):
        if not isinstance(r.get("task"), str):
            raise ValueError(f"target row {i} has no string 'task' field; every target row needs prompt, response and task")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model = add_lora(model, config)
    pool_ex = EncodedExamples(tokenizer, pool, config.max_length)
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


def load_model(path: str | os.PathLike, gguf_file: str | None = None) -> tuple[nn.Module, Any]:
    """A local Hugging Face causal LM and its tokenizer, in fp32 (no download)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ImportError("selection needs transformers and peft: pip install 'hessfree[llm]'") from e
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {str(path)!r} is not a folder; pass a saved Hugging Face model folder")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32, **kw)
    return model, tokenizer


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
    (its row number in the pool) and ``hessfree_score`` (its selection score),
    best first. ``workdir`` (default ``<out>.work``) holds checkpoints and the
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
