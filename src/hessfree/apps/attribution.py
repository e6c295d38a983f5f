"""Which training examples of a fine-tuned causal language model helped each query (TracIn-CP).

For a training example ``z_i`` and a query ``q`` (a prompt and its response),

    score(i, q) = sum_c eta_c * grad l(z_i; theta_c) . grad l(q; theta_c)

over the checkpoints ``theta_c`` of the fine-tuning run, ``eta_c`` the learning
rate in effect around checkpoint ``c``. Units: the first-order decrease of the
query's loss (nats per response token with ``reduction="mean"``, nats with
``"sum"``) per unit learning rate, summed over the checkpoints with their
learning rates. Positive = steps on the training example lowered the query's
loss (the example helped); negative = it hurt.

:func:`attribute` writes, for each query file, the ``k`` training examples with
the highest score for each query, with the per-checkpoint terms of each score
(``member_scores``, already multiplied by ``eta_c``, summing to ``score``) and
their spread (``std``). The per-example gradients of the training file are
computed once, into ``<out_dir>/store``, and reused by every later call with
the same model, checkpoints, training file and projection.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_write_json, atomic_write_text, check_settings, iter_jsonl
from ..errors import HessfreeError
from ..influence import Influence
from ..llm import IGNORE, LanguageModelTask
from ..members import Checkpoints
from ..projections import Factorized
from ..store import GradientStore

SETTINGS_FILE = "settings.json"
FORMAT = "hessfree.attribute"
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class AttributionSettingsError(HessfreeError, ValueError):
    """``out_dir`` was written with another model, checkpoints, training file or
    projection; the message names each setting that differs (saved vs now)."""


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


@dataclass
class AttributionReport:
    """What :func:`attribute` wrote for one query file.

    Attributes:
        query_file: the query file.
        jsonl: ``<out_dir>/<stem>.attribution.jsonl``, one line per query.
        markdown: ``<out_dir>/<stem>.attribution.md``, the same as a readable report.
        records: the lines of ``jsonl``, as dicts.
    """

    query_file: Path
    jsonl: Path
    markdown: Path
    records: list[dict[str, Any]]


# ---- reading files ------------------------------------------------------------------------------------


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


def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


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


def attribute(
    model: nn.Module | str | os.PathLike,
    train_file: str | os.PathLike,
    query_files: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    adapter: str | os.PathLike | None = None,
    checkpoints: Any = None,
    lrs: float | Sequence[float] | None = None,
    k: int = 10,
    projection_dim: int | None = 4096,
    per_token: bool = False,
    max_length: int = 256,
    reduction: str = "mean",
    batch_size: int = 8,
    seed: int = 0,
    progress: bool | None = None,
) -> list[AttributionReport]:
    """The ``k`` training examples that helped each query most, by TracIn-CP, as files.

    ``score(i, q) = sum_c eta_c * g_i(theta_c) . g_q(theta_c)`` with ``g`` the gradient
    of the example's loss over the response tokens (see the module docstring). Units:
    first-order decrease of the query's loss per unit learning rate, summed over the
    checkpoints with their learning rates; positive = the training example helped the query.

    Files written in ``out_dir``:

    * ``store/``: the training examples' (projected) gradients at every checkpoint,
      computed once (resumably) and reused by later calls;
    * ``settings.json``: what the store describes; a later call with another model,
      checkpoints, learning rates, training file, projection or tokenisation is refused;
    * per query file, ``<stem>.attribution.jsonl``: one line per query,
      ``{"query_index", "query_line", "query_text", "k", "top": [{"rank", "train_index",
      "train_line", "train_text", "score", "member_scores", "std"[, "tokens"]}]}`` with
      ``train_index`` the 0-based row of the training file (blank lines skipped),
      ``member_scores`` the terms ``eta_c g_i . g_q`` of each checkpoint (summing to
      ``score``) and ``std`` their sample standard deviation (``null`` with one
      checkpoint); and ``<stem>.attribution.md``, the same as a readable report.

    With ``per_token=True`` each top example also gets ``tokens``: for every response
    token ``t`` of the query, ``{"position", "token_id", "token", "score"}`` with
    ``score = sum_c eta_c g_i . grad(w_t l_t)``, ``l_t`` the token's loss (nats) and
    ``w_t`` its weight in the query loss (``1 / n_response_tokens`` with
    ``reduction="mean"``, 1 with ``"sum"``); the token scores sum to ``score``.

    Args:
        model: a Hugging Face causal LM folder (fp32), a peft adapter folder whose
            base model is a local folder, or an ``nn.Module`` (then ``tokenizer=`` is needed).
        train_file: JSON lines; each row ``prompt``/``response``, ``text`` (every token
            after the first carries loss), or Alpaca ``instruction``/``input``/``output``.
            With a chat template, prompts (and Alpaca instruction + input) are a user turn.
        query_files: one or more files in the same formats.
        out_dir: the output folder (created).
        tokenizer: the tokenizer (default: the model folder's); right padding is used.
        adapter: a peft adapter folder applied to ``model`` (its parameters are then
            the ones differentiated; otherwise all parameters with ``requires_grad``).
        checkpoints: a Trainer ``output_dir`` (read with
            :meth:`hessfree.members.Checkpoints.from_trainer`), a
            :class:`~hessfree.members.Checkpoints`, a list of state dicts / paths (with
            ``lrs``), or ``None`` (the model as it is, weight 1: plain gradient products).
        lrs: learning rates of the listed checkpoints (or overriding the Trainer's).
        k: training examples listed per query (the top ``min(k, n_train)``).
        projection_dim: total projected dimension (:class:`hessfree.projections.Factorized`);
            ``None``: exact gradients (small models only: store size n_train x n_params).
        per_token: also decompose each top score over the query's response tokens.
        max_length: tokens per example (responses truncated, never prompts).
        reduction: the per-example loss: ``"mean"`` nats per response token or ``"sum"``.
        batch_size: examples per gradient batch.
        seed: seed of the projection matrices.
        progress: progress bars (``None``: only on a terminal).

    Returns:
        one :class:`AttributionReport` per query file, in order.

    Raises:
        ValueError: a setting out of range, a malformed row (file and line named), two
            query files with the same stem, a list of checkpoints without ``lrs``.
        FileNotFoundError: a missing file or folder.
        AttributionSettingsError: ``out_dir`` holds results of other settings (named).
        hessfree.store.StoreMismatchError: the store's content differs from the
            training data or checkpoints now (checked by the store).
    """
    # ---- arguments, before any model is loaded -----------------------------------------------------------
    _positive_int("k", k)
    _positive_int("max_length", max_length)
    _positive_int("batch_size", batch_size)
    if projection_dim is not None:
        _positive_int("projection_dim", projection_dim)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(per_token, bool):
        raise TypeError(f"per_token must be True or False, got {per_token!r}")
    train_path = Path(train_file)
    queries = [Path(query_files)] if isinstance(query_files, (str, os.PathLike)) else [Path(q) for q in query_files]
    if not queries:
        raise ValueError("query_files is empty; pass one or more JSON-lines files")
    stems = [q.name.removesuffix(".jsonl") for q in queries]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise ValueError(f"two query files share the name {twice[0]!r}, so their reports would overwrite each other; rename one")
    for p in [train_path, *queries]:
        if not p.is_file():
            raise FileNotFoundError(f"{str(p)!r} does not exist or is not a file; pass a JSON-lines file")
    members = _members(checkpoints, lrs)
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("model is an nn.Module, so tokenizer= is needed (the tokenizer it was trained with)")
        if adapter is not None:
            raise ValueError("adapter= applies to a model folder; wrap an in-memory model with peft yourself")
        lm = model
    elif isinstance(model, (str, os.PathLike)):
        if not Path(model).is_dir():
            raise FileNotFoundError(f"model {str(model)!r} is not a folder; pass a saved Hugging Face model folder")
        if adapter is not None and not Path(adapter).is_dir():
            raise FileNotFoundError(f"adapter {str(adapter)!r} is not a folder; pass a peft save_pretrained folder")
        lm = None
    else:
        raise TypeError(f"model must be a model folder or an nn.Module, got {type(model).__name__}")

    # ---- data (cheap), then the model --------------------------------------------------------------------
    if lm is None:
        lm, loaded_tok = load_model(model, adapter)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    template = chat_template(tokenizer)
    train = read_examples(train_path, template)
    query_sets = [read_examples(q, template) for q in queries]
    enc = lambda ex, where: encode_example(tokenizer, ex, where, max_length, template is not None)  # noqa: E731
    train_enc = [enc(e, str(train_path)) for e in train]
    query_enc = [[enc(e, str(q)) for e in rows] for q, rows in zip(queries, query_sets)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # ---- settings: refuse another model / checkpoints / data / projection -------------------------------
    from ..store import fingerprint_tensors

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "format": FORMAT,
        "model": fingerprint_tensors({**dict(lm.named_parameters()), **dict(lm.named_buffers())}),
        "trainable": fingerprint_tensors({n: torch.zeros(0) for n, p in lm.named_parameters() if p.requires_grad}),
        "checkpoints": None if members is None else [_describe_checkpoint(s) for s in members.states],
        "lrs": None if members is None else list(members.lrs),
        "train_file_sha256": _file_sha256(train_path),
        "n_train": len(train),
        "projection_dim": projection_dim,
        "seed": seed,
        "max_length": max_length,
        "reduction": reduction,
        "tokens": fingerprint_tensors({"ids": torch.cat([e["input_ids"] for e in train_enc]),
                                       "labels": torch.cat([e["labels"] for e in train_enc])}),  # fmt: skip
    }
    settings_path = out_dir / SETTINGS_FILE
    if settings_path.is_file():
        check_settings(settings_path, json.loads(settings_path.read_text()), settings, error=AttributionSettingsError,
                       fix="use a new out_dir for the new settings, or the settings the folder was written with")  # fmt: skip
    else:
        atomic_write_json(settings_path, settings)

    # ---- training features (stored once), then each query file --------------------------------------------
    from ..selection import make_loader

    task = LanguageModelTask(lm, reduction=reduction)
    projection = Factorized(projection_dim, seed=seed) if projection_dim is not None else None
    was = lm.training
    lm.eval()
    try:
        est = Influence(task, members=members, projection=projection, batch_size=batch_size,
                        store=out_dir / "store", progress=progress).fit(make_loader(train_enc, batch_size, pad_id))  # fmt: skip
        reports = []
        for q, stem, rows, encoded in zip(queries, stems, query_sets, query_enc):
            records = _attribute_file(est, out_dir / "store", tokenizer, rows, encoded, train, k, per_token, reduction, batch_size, pad_id)
            jsonl = atomic_write_text(out_dir / f"{stem}.attribution.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            md = atomic_write_text(out_dir / f"{stem}.attribution.md", _markdown(q, train_path, records, est, per_token))
            reports.append(AttributionReport(q, jsonl, md, records))
    finally:
        lm.train(was)
    return reports


def _one_token_copies(example: dict[str, torch.Tensor]) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """One copy of ``example`` per response token, each keeping that token's label only
    (position > 0: the first token is never predicted)."""
    labels = example["labels"]
    positions = [int(p) for p in torch.nonzero(labels != IGNORE).flatten() if int(p) > 0]
    copies = []
    for p in positions:
        keep = torch.full_like(labels, IGNORE)
        keep[p] = labels[p]
        copies.append({**example, "labels": keep})
    return copies, positions


def _features(est: Influence, m: int, examples: list[dict], batch_size: int, pad_id: int) -> torch.Tensor:
    """Per-example features ``(n, dim)`` fp64 of ``examples`` at member ``m`` (the same
    map as the training features and the queries of ``top_k``)."""
    from ..selection import make_loader

    return est.features(make_loader(examples, batch_size, pad_id), member=m).double()


def _attribute_file(est: Influence, store_path: Path, tokenizer: Any, rows: list[Example], encoded: list[dict], train: list[Example],
                    k: int, per_token: bool, reduction: str, batch_size: int, pad_id: int) -> list[dict[str, Any]]:  # fmt: skip
    from ..selection import make_loader

    top = est.top_k(make_loader(encoded, batch_size, pad_id), k)
    idx, scores = top.indices, top.scores  # (n_query, kk)
    wanted = sorted({int(i) for i in idx.flatten()})
    col = {i: c for c, i in enumerate(wanted)}
    n_q, kk = idx.shape
    n_m = len(est.member_weights)
    terms = np.zeros((n_m, n_q, kk))
    copies = [_one_token_copies(e) for e in encoded] if per_token else []
    token_terms = [np.zeros((n_m, len(c[1]), kk)) for c in copies]
    store = GradientStore.open_existing(store_path)
    # every token copy of every query, featurized in one pass per member
    token_rows = [c for cps, _ in copies for c in cps]
    starts = np.cumsum([0] + [len(cps) for cps, _ in copies])
    for m in range(n_m):
        w = float(est.member_weights[m])
        train_f = torch.cat([store.rows(m, i, i + 1) for i in wanted]).double()  # (n_wanted, dim), as stored
        query_f = _features(est, m, encoded + token_rows, batch_size, pad_id)  # (n_q + n_tokens, dim)
        for j in range(n_q):
            g = train_f[[col[int(i)] for i in idx[j]]]  # (kk, dim)
            terms[m, j] = w * (g @ query_f[j]).numpy()
            if per_token:
                cps, _ = copies[j]
                share = 1.0 / len(cps) if reduction == "mean" else 1.0  # w_t: the token's weight in the query loss
                tok_f = query_f[n_q + starts[j] : n_q + starts[j + 1]]  # (n_tokens, dim)
                token_terms[j][m] = w * share * (tok_f @ g.T).numpy()
    total = terms.sum(0)
    scale = np.abs(terms).sum(0) + np.abs(scores) + 1e-30
    if not np.all(np.abs(total - scores) <= 1e-3 * scale):
        bad = np.unravel_index(int(np.argmax(np.abs(total - scores) / scale)), scores.shape)
        raise RuntimeError(
            f"the member terms of query {bad[0]}, training row {int(idx[bad])} sum to {total[bad]:.6g} but top_k scored it "
            f"{scores[bad]:.6g}; the store does not match the model's features (delete the out_dir's store and rerun)"
        )
    out = []
    for j, ex in enumerate(rows):
        top_rows = []
        for r in range(kk):
            i = int(idx[j, r])
            member = terms[:, j, r]
            item: dict[str, Any] = {
                "rank": r + 1,
                "train_index": i,
                "train_line": train[i].line,
                "train_text": train[i].display,
                "score": float(scores[j, r]),
                "member_scores": [float(x) for x in member],
                "std": float(np.std(member, ddof=1)) if n_m > 1 else None,
            }
            if per_token:
                cps, positions = copies[j]
                ids = encoded[j]["input_ids"]
                per = token_terms[j][:, :, r].sum(0)
                item["tokens"] = [{"position": p, "token_id": int(ids[p]), "token": _token_text(tokenizer, int(ids[p])),
                                   "score": float(s)} for p, s in zip(positions, per)]  # fmt: skip
            top_rows.append(item)
        out.append({"query_index": j, "query_line": ex.line, "query_text": ex.display, "k": kk, "top": top_rows})
    return out


def _cell(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|")


def _markdown(query_file: Path, train_file: Path, records: list[dict[str, Any]], est: Influence, per_token: bool) -> str:
    lrs = ", ".join(f"{w:.3g}" for w in est.member_weights)
    lines = [
        f"# Training examples that helped each query of `{query_file.name}`",
        "",
        f"Training file `{train_file.name}` ({est.n_train} rows); "
        + (f"{len(est.member_weights)} checkpoint(s), learning rates {lrs}. Score = TracIn-CP: the first-order decrease "
           "of the query's loss per unit learning rate, summed over the checkpoints with their learning rates; "
           if isinstance(est.members, Checkpoints) else
           "no checkpoints: the model as it is, weight 1. Score = the first-order decrease of the query's loss per unit "
           "learning rate; ")
        + "positive = the training example helped the query. ± = the standard deviation of the per-checkpoint terms.",
        "",
    ]
    for rec in records:
        lines += [f"## Query {rec['query_index']} (line {rec['query_line']})", "", f"> {_cell(rec['query_text'], 300)}", "",
                  "| rank | train row | score | ± | training example |", "|---|---|---|---|---|"]  # fmt: skip
        for t in rec["top"]:
            std = "" if t["std"] is None else f"{t['std']:.3g}"
            lines.append(f"| {t['rank']} | {t['train_index']} | {t['score']:.4g} | {std} | {_cell(t['train_text'])} |")
        lines.append("")
        if per_token:
            for t in rec["top"]:
                toks = " ".join(f"`{_cell(x['token'], 20).replace('`', '')}` {x['score']:+.3g}" for x in t["tokens"])
                lines.append(f"- row {t['train_index']}, per response token: {toks}")
            lines.append("")
    return "\n".join(lines)


__all__ = ["AttributionReport", "AttributionSettingsError", "Example", "attribute", "chat_template",
           "encode_example", "load_model", "read_examples"]  # fmt: skip

