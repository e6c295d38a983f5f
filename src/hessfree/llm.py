"""Causal language models (Hugging Face ``transformers``, with or without a peft
LoRA adapter) as a hessfree :class:`~hessfree.task.Task`.

Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels``; label
``-100`` marks tokens that carry no loss (the prompt and the padding). Padding
must be on the right: the model is then called with ``input_ids`` only (causal
attention means right padding cannot change the logits of earlier tokens),
which is what makes per-example gradients with ``torch.func.vmap`` possible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch
from .errors import DataError
from .task import Task

IGNORE = -100


class LanguageModelTask(Task):
    """Per-example loss of a causal LM over its response tokens.

    Args:
        model: a causal LM returning logits ``(B, T, V)`` (or an object with ``.logits``).
        reduction: ``"mean"`` (default): mean negative log-likelihood over the
            example's response tokens, in nats per token, so long and short
            responses weigh the same; ``"sum"``: total nats of the response.
        label_key: key of the labels (``-100`` = no loss at that position).

    Token t's label is predicted from the logits at position t - 1 (the usual
    shift). When the batch has no labels, every non-padding token is a target.
    """

    def __init__(self, model: nn.Module, reduction: str = "mean", label_key: str = "labels", weight_key: str = "weight"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        super().__init__(model, loss_fn=None, label_key=label_key, weight_key=weight_key)
        self.reduction = reduction

    def _labels(self, batch: Batch) -> torch.Tensor:
        if self.label_key in batch:
            return batch[self.label_key]
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        return ids if mask is None else ids.masked_fill(mask == 0, IGNORE)

    def check_batch(self, batch: Batch) -> None:
        """Right padding and at least one target token per example (checked
        before any per-example transform, with the example index in the error)."""
        if "input_ids" not in batch:
            raise KeyError(f"language-model batches need 'input_ids' (keys: {sorted(batch)})")
        mask = batch.get("attention_mask")
        if mask is not None:
            m = mask.to(torch.int64)
            bad = torch.nonzero((m[:, 1:] > m[:, :-1]).any(1)).flatten()
            if bad.numel():
                raise DataError.in_batch(int(bad[0]), lambda where: f"{where} is padded on the left; hessfree needs "
                                         "right padding (tokenizer.padding_side = 'right')")  # fmt: skip
        labels = self._labels(batch)
        empty = torch.nonzero((labels[:, 1:] == IGNORE).all(1)).flatten()
        if empty.numel():
            raise DataError.in_batch(int(empty[0]), lambda where: f"{where} has no target token (every label after "
                                     "the first is -100); give it a non-empty response or drop it")  # fmt: skip

    def inputs(self, batch: Batch) -> tuple[tuple, dict]:
        return (), {"input_ids": batch["input_ids"]}

    def forward(self, model, batch: Batch) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"])
        return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)

    def labels(self, batch: Batch) -> torch.Tensor:
        return self._labels(batch)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = self._labels(batch)[:, 1:]
        logits = outputs[:, :-1]
        valid = labels != IGNORE
        logp = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
        nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
        total = nll.sum(1)
        if self.reduction == "sum":
            return total
        return total / valid.sum(1).clamp_min(1)


def encode(
    tokenizer: Any,
    prompt: str,
    response: str,
    max_length: int = 256,
    add_eos: bool = True,
) -> dict[str, torch.Tensor]:
    """Tokenise one prompt/response pair; the prompt's labels are ``-100``.

    Returns 1-D ``input_ids``, ``attention_mask`` and ``labels``. The response
    is truncated (never the prompt) to fit ``max_length``.
    """
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    if len(p) >= max_length:
        raise ValueError(f"the prompt has {len(p)} tokens, more than max_length={max_length}; raise max_length")
    r = r[: max_length - len(p)]
    ids = torch.tensor(p + r)
    labels = torch.tensor([IGNORE] * len(p) + r)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def collate(examples: Sequence[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad 1-D examples from :func:`encode` into one batch."""
    if not examples:
        raise ValueError("collate needs at least one example")
    longest = max(int(e["input_ids"].shape[0]) for e in examples)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, longest - t.shape[0]), value=value)

    return {
        "input_ids": torch.stack([pad(e["input_ids"], pad_id) for e in examples]),
        "attention_mask": torch.stack([pad(e["attention_mask"], 0) for e in examples]),
        "labels": torch.stack([pad(e["labels"], IGNORE) for e in examples]),
    }
