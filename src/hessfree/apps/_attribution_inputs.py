"""Inputs of :func:`hessfree.apps.attribute`: JSONL examples (Alpaca or chat), their
tokenization, the model folder and the checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import iter_jsonl
from ..llm import IGNORE
from ..members import Checkpoints

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Example:
    """One row of a JSON-lines file, as the model reads it.

    Attributes:
        line: line number in its file (1-based).
        prompt: the prompt text after templating (``""`` for ``text`` rows).
        response: the text that carries the loss.
        display: a readable form of the row (for reports): prompt and response.
        kind: ``"prompt/response"``, ``"text"`` or ``"alpaca"``.
    """

    line: int
    prompt: str
    response: str
    display: str
    kind: str


def _row_to_example(row: Any, where: str, line: int, template: Any) -> Example:
    def s(key: str) -> str | None:
        v = row.get(key)
        return v if isinstance(v, str) else None

    if not isinstance(row, dict):
        raise ValueError(f"{where}:{line} is a JSON {type(row).__name__}, not an object; each row needs "
                         "prompt/response, text, or instruction/input/output")  # fmt: skip
    if s("prompt") is not None and s("response") is not None:
        prompt, response, kind = s("prompt"), s("response"), "prompt/response"
        display = f"{prompt}\n{response}"
    elif s("instruction") is not None and s("output") is not None:
        inp = row.get("input", "")
        if not isinstance(inp, str):
            raise ValueError(f"{where}:{line}: 'input' is {type(inp).__name__}, not a string")
        instruction, response, kind = s("instruction"), s("output"), "alpaca"
        user = f"{instruction}\n\n{inp}" if inp else instruction
        display = f"{user}\n{response}"
        if template is None:
            prompt = (ALPACA_PROMPT_INPUT if inp else ALPACA_PROMPT).format(instruction=instruction, input=inp)
        else:
            prompt = user
    elif s("text") is not None:
        return Example(line, "", s("text"), s("text"), "text")
    else:
        raise ValueError(
            f"{where}:{line} has none of the accepted string fields (keys: {sorted(row)[:8]}); each row needs "
            "'prompt' and 'response', or 'text', or 'instruction' and 'output' (Alpaca, 'input' optional)"
        )
    if template is not None:
        prompt = template(prompt)
    return Example(line, prompt, response, display, kind)


def read_examples(path: str | os.PathLike, template: Any = None) -> list[Example]:
    """The rows of a JSON-lines file as :class:`Example` (formats may be mixed).

    Args:
        path: the file.
        template: ``f(user_text) -> prompt`` applied to prompt/response and Alpaca
            prompts (the tokenizer's chat template); ``None``: prompts as written,
            Alpaca rows in the Alpaca prompt format.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not JSON or lacks the fields (file and line named), or no rows.
    """
    return [_row_to_example(row, str(path), line_no, template) for line_no, row in iter_jsonl(path)]


def chat_template(tokenizer: Any) -> Any:
    """``f(user_text) -> prompt`` with the tokenizer's chat template (a user turn and the
    assistant's opening), or ``None`` when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
        return None

    def apply(user: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)

    return apply


def encode_example(tokenizer: Any, ex: Example, where: str, max_length: int, templated: bool) -> dict[str, torch.Tensor]:
    """1-D ``input_ids`` / ``attention_mask`` / ``labels`` of one example; the prompt's
    labels are ``-100``, the response ends with the EOS token and is truncated to fit
    ``max_length`` (never the prompt). A templated prompt carries its own special tokens.

    Raises:
        ValueError: a prompt of ``max_length`` tokens or more, or an example without
            a target token (an empty text), naming the file and line.
    """
    specials = not templated or ex.kind == "text"
    p = list(tokenizer(ex.prompt, add_special_tokens=specials)["input_ids"])
    r = list(tokenizer(ex.response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        r.append(tokenizer.eos_token_id)
    if len(p) >= max_length:
        raise ValueError(f"{where}:{ex.line}: the prompt has {len(p)} tokens, max_length={max_length}; raise max_length")
    r = r[: max_length - len(p)]
    ids = p + r
    labels = [IGNORE] * len(p) + r
    if all(t == IGNORE for t in labels[1:]):
        raise ValueError(f"{where}:{ex.line} has no token to predict (empty response or text); give it one or drop it")
    t = torch.tensor(ids)
    return {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": torch.tensor(labels)}


# ---- the model --------------------------------------------------------------------------------------------


def _has_weights(folder: Path) -> bool:
    return any((folder / f).exists() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                               "pytorch_model.bin.index.json", "config.json"))  # fmt: skip


def load_model(model: str | os.PathLike, adapter: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """A local causal LM (fp32) and its tokenizer; with a peft adapter folder, a
    ``PeftModel`` whose adapter parameters are the trainable ones.

    ``model`` may itself be an adapter folder whose ``adapter_config.json`` names a
    local base-model folder.

    Raises:
        FileNotFoundError: a folder that does not exist, or an adapter whose base
            model is not a local folder (pass ``model=<base folder>, adapter=<adapter folder>``).
    """
    from ..selection import load_model as load_base

    folder = Path(model)
    if not folder.is_dir():
        raise FileNotFoundError(f"model {str(folder)!r} is not a folder; pass a saved Hugging Face model folder")
    if adapter is None and (folder / "adapter_config.json").is_file() and not _has_weights(folder):
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise FileNotFoundError(
                f"{str(folder)!r} is a peft adapter whose base model {base!r} is not a local folder; pass "
                "model=<base model folder> and adapter=<this folder>"
            )
        folder, adapter = Path(base), folder
    lm, tokenizer = load_base(folder)
    if adapter is None:
        return lm, tokenizer
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter {str(adapter)!r} has no adapter_config.json; pass a peft save_pretrained folder")
    try:
        import peft
    except ImportError as e:
        raise ImportError("a peft adapter needs peft: pip install 'hessfree[llm]'") from e
    if (adapter / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter, local_files_only=True)
        tokenizer.padding_side = "right"
    return peft.PeftModel.from_pretrained(lm, adapter, is_trainable=True), tokenizer


def _members(checkpoints: Any, lrs: Any) -> Checkpoints | None:
    if checkpoints is None:
        if lrs is not None:
            raise ValueError("lrs= was given without checkpoints=; pass the checkpoints the learning rates belong to")
        return None
    if isinstance(checkpoints, Checkpoints):
        if lrs is not None:
            raise ValueError("lrs= was given with a Checkpoints object, which holds its own rates; pass one or the other")
        return checkpoints
    if isinstance(checkpoints, (str, os.PathLike)):
        return Checkpoints.from_trainer(checkpoints, lrs=lrs)
    if isinstance(checkpoints, (list, tuple)):
        if lrs is None:
            raise ValueError(
                f"checkpoints= is a list of {len(checkpoints)} but lrs= is missing; pass the learning rate in effect "
                "at each checkpoint (TracIn-CP weighs each by it), or a Trainer output_dir / Checkpoints.from_trainer"
            )
        return Checkpoints(list(checkpoints), lrs=lrs)
    raise TypeError(
        f"checkpoints={type(checkpoints).__name__} is not understood; pass a Trainer output_dir, "
        "hf.members.Checkpoints(...) / Checkpoints.from_trainer(...), a list of state dicts or paths with lrs=, or None"
    )


def _describe_checkpoint(c: Any) -> str:
    if isinstance(c, dict):
        from ..store import fingerprint_tensors

        return "state dict " + fingerprint_tensors({k: v for k, v in c.items() if isinstance(v, torch.Tensor)})
    return str(Path(c).resolve())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _token_text(tokenizer: Any, token_id: int) -> str:
    for fn in ("decode", "convert_ids_to_tokens"):
        f = getattr(tokenizer, fn, None)
        if f is not None:
            try:
                out = f([token_id])
                return out if isinstance(out, str) else str(out[0])
            except Exception:  # noqa: BLE001 - a minimal tokenizer may not decode; the id is shown instead
                pass
    return str(token_id)


# ---- the application ------------------------------------------------------------------------------------------
