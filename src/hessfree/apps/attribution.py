"""Which training examples of a fine-tuned causal language model helped each query (TracIn-CP).

For a training example ``z_i`` and a query ``q`` (a prompt and its response),

    score(i, q) = sum_c eta_c * grad l(z_i; theta_c) . grad l(q; theta_c)

over the checkpoints ``theta_c`` of the fine-tuning run, ``eta_c`` the learning
rate in effect around checkpoint ``c``. Units: the first-order decrease of the
query's loss (nats per response token with ``reduction="mean"``, nats with
``"sum"``) per unit learning rate, summed over the checkpoints with their
learning rates. Positive = steps on the training example lowered the query's
loss (the example helped); negative = it hurt.

With ``hessian="fisher"`` (the default) each term is curvature-corrected,
``eta_c * g_i^T F_c^{-1} g_q`` with ``F_c = Phi_c^T Phi_c / n + lambda_c I`` the
damped empirical Fisher of checkpoint ``c``'s (projected) training gradients
(:class:`hessfree.hessian.EmpiricalFisher`, the curvature of TRAK and LoGra;
``lambda_c`` = the mean eigenvalue of ``Phi_c^T Phi_c / n``, ``damping_ratio=1``):
on MNIST it triples the linear datamodeling score of the plain products
(docs/fidelity.md part (d)) and in the fact-tracing study it ranks a planted
example first far more often (docs/fact_tracing.md). ``hessian="identity"``
gives the plain TracIn-CP products above.

:func:`attribute` writes, for each query file, the ``k`` training examples with
the highest score for each query, with the per-checkpoint terms of each score
(``member_scores``, already multiplied by ``eta_c``, summing to ``score``) and
their spread (``std``). The per-example gradients of the training file are
computed once, into ``<out_dir>/store``, and reused by every later call with
the same model, checkpoints, training file and projection.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._checks import integer
from .._io import atomic_write_json, atomic_write_text, check_settings
from .._modes import eval_mode
from ..errors import HessfreeError
from ..hessian.fisher import DEFAULT_MAX_DIM as FISHER_MAX_DIM
from ..hessian.fisher import check_damping_ratio
from ..influence import Influence
from ..llm import LanguageModelTask
from ..projections import Factorized
from ._attribution_inputs import (
    Example,
    _describe_checkpoint,
    _file_sha256,
    _members,
    chat_template,
    encode_example,
    load_model,
    read_examples,
)
from ._attribution_scores import _attribute_file, _markdown

SETTINGS_FILE = "settings.json"
FORMAT = "hessfree.attribute"


class AttributionSettingsError(HessfreeError, ValueError):
    """``out_dir`` was written with another model, checkpoints, training file or
    projection; the message names each setting that differs (saved vs now)."""


ATTRIBUTION_DAMPING_RATIO = 1.0  # see ``attribute(damping_ratio=)``

@dataclass
class AttributionReport:
    """What :func:`attribute` wrote for one query file.

    Attributes:
        query_file: the query file.
        jsonl: ``<out_dir>/<stem>.attribution.jsonl``, one line per query.
        markdown: ``<out_dir>/<stem>.attribution.md``, the same as a readable report.
        records: the lines of ``jsonl``, as dicts.
        trust: with ``trust=True``, the :class:`hessfree.diagnostics.TrustReport` of the
            query file's mean loss (also written as ``<out_dir>/<stem>.trust/trust.json``).
    """

    query_file: Path
    jsonl: Path
    markdown: Path
    records: list[dict[str, Any]]
    trust: Any = None


# ---- reading files ------------------------------------------------------------------------------------


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
    hessian: str = "fisher",
    damping_ratio: float | None = None,
    trust: bool = False,
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
      checkpoint), and ``"hessian"``: ``null`` for plain products, or
      ``{"method": "fisher", "damping_ratio", "damping": [lambda_c per checkpoint]}``;
      and ``<stem>.attribution.md``, the same as a readable report. A ``<stem>.trust/trust.json``
      of an earlier ``trust=True`` call is removed when this call does not run the check.

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
        hessian: ``"fisher"`` (default; curvature-corrected terms, see the module
            docstring) or ``"identity"`` (plain TracIn-CP products). The store does
            not depend on it: one store serves both.
        damping_ratio: with ``"fisher"``, ``lambda_c = damping_ratio * trace(F_c) / k``
            (default ``None``: 1.0 here, 10x the estimator's general default, because for
            attribution it scored better everywhere it was measured: the linear datamodeling
            score of both MNIST models at k in the thousands, ``benchmarks/fisher_damping.py``,
            docs/fidelity.md part (d); and the fact-tracing study's second seed, recall@3 of the
            planted rows 0.64 against 0.40 at 0.1 with the same MRR, docs/fact_tracing.md).
        trust: also run :func:`hessfree.diagnostics.trust` on each query file's mean
            loss: identity scores against the damped empirical Fisher of the same
            (projected) training gradients, both read from the store (no second pass
            over the training data), with a verdict on whether the identity is adequate.
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
    k, max_length, batch_size = integer(k, "k"), integer(max_length, "max_length"), integer(batch_size, "batch_size")
    if projection_dim is not None:
        projection_dim = integer(projection_dim, "projection_dim")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(per_token, bool):
        raise TypeError(f"per_token must be True or False, got {per_token!r}")
    if hessian not in ("fisher", "identity"):
        raise ValueError(f"hessian must be 'fisher' or 'identity', got {hessian!r}")
    if not isinstance(trust, bool):
        raise TypeError(f"trust must be True or False, got {trust!r}")
    if damping_ratio is not None:
        check_damping_ratio(damping_ratio)
    if damping_ratio is not None and hessian != "fisher":
        raise ValueError(f"damping_ratio={damping_ratio} applies to hessian='fisher' only, got hessian={hessian!r}")
    options = None if hessian != "fisher" else {
        "damping_ratio": ATTRIBUTION_DAMPING_RATIO if damping_ratio is None else float(damping_ratio)}
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

    if hessian == "fisher" and projection_dim is None:  # refused before any file is written
        n_params = sum(p.numel() for p in lm.parameters() if p.requires_grad)
        if n_params > FISHER_MAX_DIM:
            raise ValueError(f"hessian='fisher' on exact gradients needs a {n_params:,} x {n_params:,} matrix per "
                             f"checkpoint (at most {FISHER_MAX_DIM:,}); project the gradients (projection_dim, "
                             "--dim) or use hessian='identity' (--hessian identity)")

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
    fresh = not settings_path.is_file()
    if fresh:
        atomic_write_json(settings_path, settings)
    else:
        check_settings(settings_path, json.loads(settings_path.read_text()), settings, error=AttributionSettingsError,
                       fix="use a new out_dir for the new settings, or the settings the folder was written with")  # fmt: skip

    # ---- training features (stored once), then each query file --------------------------------------------
    from ..selection import make_loader

    task = LanguageModelTask(lm, reduction=reduction)
    projection = Factorized(projection_dim, seed=seed) if projection_dim is not None else None
    modes = ExitStack()
    modes.enter_context(eval_mode(lm))  # each submodule's mode restored at the end
    try:  # a failure before the store exists frees the folder of the settings.json written above
        est = Influence(task, members=members, projection=projection, batch_size=batch_size, hessian=hessian,
                        hessian_options=options, store=out_dir / "store", progress=progress).fit(make_loader(train_enc, batch_size, pad_id))  # fmt: skip
        reports, plain = [], est
        if trust and hessian != "identity":  # trust() compares an identity estimator with the Fisher, on the same store
            plain = Influence(task, members=members, projection=projection, batch_size=batch_size,
                              store=out_dir / "store", progress=progress)  # fmt: skip
        curvature = None if hessian == "identity" else {
            "method": "fisher", "damping_ratio": options["damping_ratio"],
            "damping": [rep["damping"] for rep in est.hessian_report_.values()]}  # fmt: skip
        for q, stem, rows, encoded in zip(queries, stems, query_sets, query_enc):
            records = _attribute_file(est, out_dir / "store", tokenizer, rows, encoded, train, k, per_token, reduction, batch_size, pad_id)
            for rec in records:
                rec["hessian"] = curvature
            stale = out_dir / f"{stem}.trust" / "trust.json"
            if not trust and stale.is_file():  # a verdict about earlier scores must not sit beside these
                stale.unlink()
            jsonl = atomic_write_text(out_dir / f"{stem}.attribution.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            md = atomic_write_text(out_dir / f"{stem}.attribution.md", _markdown(q, train_path, records, est, per_token, hessian))
            verdict = None
            if trust:
                from ..diagnostics import trust as trust_check

                verdict = trust_check(plain, make_loader(train_enc, batch_size, pad_id), make_loader(encoded, batch_size, pad_id),
                                      hessian="fisher", hessian_options=options, batch_size=batch_size, progress=progress,
                                      save_to=out_dir / f"{stem}.trust")  # fmt: skip
            reports.append(AttributionReport(q, jsonl, md, records, verdict))
    except BaseException:
        if fresh and not (out_dir / "store").exists():  # nothing was computed: the folder is not bound to these settings
            settings_path.unlink(missing_ok=True)
        raise
    finally:
        modes.close()
    return reports


__all__ = ["AttributionReport", "AttributionSettingsError", "Example", "attribute", "chat_template",
           "encode_example", "load_model", "read_examples"]  # fmt: skip
