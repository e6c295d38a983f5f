"""Files in for the language-model commands: JSON-lines rows, tokenised examples,
padding loaders and local Hugging Face models (no download)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._io import iter_jsonl
from .llm import collate, encode


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
