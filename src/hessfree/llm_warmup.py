"""Stage 1 of :func:`hessfree.selection.select`: a seeded LoRA adapter and its AdamW warm-up,
saved after each epoch (resumable)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ._io import atomic_save, atomic_write_json, check_settings
from ._modes import module_mode
from ._progress import progress_bar
from .data import new_hash, update_hash
from .llm import LanguageModelTask, collate
from .selection_config import SelectionConfig
from .store import fingerprint_tensors

# ---- the adapter -----------------------------------------------------------------------------


WARMED = "_hessfree_warmed_in"
"""The attribute :func:`warmup` sets on a model whose adapter it trained in place (the work folder)."""


def add_lora(model: nn.Module, config: SelectionConfig) -> nn.Module:
    """``model`` with a fresh LoRA adapter (seeded), or ``model`` itself when it has one.

    peft adds the adapter's layers to ``model`` in place; the wrapper is remembered, so
    passing the same model again gives the same wrapper (and its parameter names).

    Raises:
        ValueError: the model's adapter has another rank than ``config.lora_r``; no
            module of the model matches ``config.lora_targets`` (its linear layers named).
    """
    wrapper = model.__dict__.get("_hessfree_peft")
    if wrapper is not None:
        model = wrapper
    if any("lora_" in n for n, _ in model.named_parameters()):
        ranks = {p.shape[0] for n, p in model.named_parameters() if "lora_A" in n and p.dim() == 2}
        if ranks and ranks != {config.lora_r}:
            raise ValueError(f"the model already has a LoRA adapter of rank {sorted(ranks)[0]}, and lora_r is "
                             f"{config.lora_r}; pass the base model (a fresh adapter is added) or lora_r="
                             f"{sorted(ranks)[0]}")  # fmt: skip
        return model
    try:
        import peft
    except ImportError as e:
        raise ImportError("selection needs peft: pip install 'hessfree[llm]'") from e
    torch.manual_seed(config.seed)
    lora = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=list(config.lora_targets), lora_dropout=0.0)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
    if not names & set(config.lora_targets):
        raise ValueError(f"lora_targets {list(config.lora_targets)} name no layer of this model; its linear layers are "
                         f"named {sorted(names)[:12]} (e.g. GPT-2: ['c_attn']; --lora-targets on the command line)")  # fmt: skip
    wrapped = peft.get_peft_model(model, lora)
    object.__setattr__(model, "_hessfree_peft", wrapped)  # not a submodule: a plain reference
    return wrapped


def check_inputs(model: nn.Module, examples: Sequence[dict[str, torch.Tensor]], workdir: Path) -> None:
    """Bind ``workdir`` to the warm-up's inputs: the tokenised pool, the model's base weights
    and its adapter's layout (hashes and shapes in ``<workdir>/inputs.json``; the adapter's
    starting values are left out, so a PeftModel built without a seed can resume). A later run with
    other inputs is refused by name, since its checkpoints, store and scores would be stale;
    so is a model whose adapter an earlier :func:`warmup` trained in place elsewhere.

    Raises:
        ValueError: naming what changed (``pool``, ``model``) or the earlier work folder.
    """
    earlier = getattr(model, WARMED, None)
    if earlier is not None and earlier != str(Path(workdir).resolve()):
        raise ValueError(f"this model's LoRA adapter was trained in place by an earlier selection (work folder "
                         f"{earlier!r}), so a new one would start from it; pass a fresh copy of the base model")  # fmt: skip
    if earlier is not None:  # the same folder: the adapter is restored from its checkpoints
        return
    h = new_hash()
    for item in examples:
        for k in sorted(item):
            h.update(k.encode())
            update_hash(h, item[k])
    named = dict(model.named_parameters())
    base = {k: v for k, v in named.items() if "lora_" not in k}  # the adapter's start may be unseeded: shapes only
    adapter = sorted([k, list(v.shape)] for k, v in named.items() if "lora_" in k)
    now = {"pool": h.hexdigest()[:32], "model": fingerprint_tensors(base), "adapter": adapter}
    path = workdir / "inputs.json"
    if path.exists():
        check_settings(workdir, json.loads(path.read_text()), now, fix="the pool or the model changed; use a new folder")
    else:
        atomic_write_json(path, now)


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
    modes = ExitStack()
    modes.enter_context(module_mode(model, True))  # each submodule's mode restored at the end
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
        modes.close()
    for m in (model, getattr(model, "get_base_model", lambda: None)()):  # peft wraps the caller's model in place
        if m is not None:
            setattr(m, WARMED, str(Path(folder).resolve().parent))
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
