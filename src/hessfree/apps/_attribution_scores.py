"""Per-member and per-token terms of the attribution scores, and the Markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..influence import Influence
from ..llm import IGNORE
from ..members import Checkpoints
from ..store import GradientStore
from ._attribution_inputs import Example, _token_text


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
    """Per-example query features ``(n, dim)`` fp64 of ``examples`` at member ``m`` (the same
    map as the training features, through the estimator's query transform, as the queries of ``top_k``)."""
    from ..selection import make_loader

    return est.query_features(make_loader(examples, batch_size, pad_id), member=m).double()


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
    sizes = np.zeros((n_q, kk))  # sum_m |w_m| |g| |q|: the size of the float32 rounding in top_k's products
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
            sizes[j] += abs(w) * (g.norm(dim=1) * query_f[j].norm()).numpy()
            if per_token:
                cps, _ = copies[j]
                share = 1.0 / len(cps) if reduction == "mean" else 1.0  # w_t: the token's weight in the query loss
                tok_f = query_f[n_q + starts[j] : n_q + starts[j + 1]]  # (n_tokens, dim)
                token_terms[j][m] = w * share * (tok_f @ g.T).numpy()
    total = terms.sum(0)
    # a store of other features misses by about |g| |q|; float32 products of cancelling terms by far less
    scale = 1e-3 * (np.abs(terms).sum(0) + np.abs(scores)) + 1e-5 * sizes + 1e-30
    if not np.all(np.abs(total - scores) <= scale):
        bad = np.unravel_index(int(np.argmax(np.abs(total - scores) / scale)), scores.shape)  # noqa: E501
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


def _markdown(query_file: Path, train_file: Path, records: list[dict[str, Any]], est: Influence, per_token: bool,
              hessian: str = "identity") -> str:
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
        + "positive = the training example helped the query. ± = the standard deviation of the per-checkpoint terms."
        + (" Each term is curvature-corrected: g_train^T F^-1 g_query with F the damped empirical Fisher of that "
           "checkpoint's training gradients (hessian='fisher'; damping "
           + ", ".join(f"{r['damping']:.3g} ({r['damping_rule']})" for r in est.hessian_report_.values()) + ")."
           if hessian == "fisher" else ""),
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
