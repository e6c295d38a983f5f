"""What the ``hessfree noisy-labels / defend / fairness`` commands run.

Data: a built-in data set by name or the user's CSV file. CSV columns: the
label (``--label``), optionally a group (``--group``) and the features
(``--features a,b,c``; default every other column). Numeric features are
standardised with the training split's mean and deviation, text columns
one-hot encoded. Splits are seeded: 60% train, 20% validation, 20% test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import datasets
from ..datasets._require import require

BUILTIN = ("digits", "mnist5k", "adult", "compas", "german")


@dataclass
class Split:
    """Train / validation / test arrays (features float32, labels int64, groups int64 or None)."""

    x: np.ndarray
    y: np.ndarray
    g: np.ndarray | None
    xv: np.ndarray
    yv: np.ndarray
    gv: np.ndarray | None
    xt: np.ndarray
    yt: np.ndarray
    gt: np.ndarray | None
    name: str
    favourable: int = 1

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = {"train": (self.x, self.y), "val": (self.xv, self.yv), "test": (self.xt, self.yt)}[part]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def _three_way(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    a, b = int(0.6 * n), int(0.8 * n)
    return perm[:a], perm[a:b], perm[b:]


def load_builtin(name: str, seed: int = 0, n_train: int | None = None) -> Split:
    """A built-in data set split train / val / test (tabular: val = half of the test split)."""
    if name in ("digits", "mnist5k"):
        X, y = datasets.digits() if name == "digits" else datasets.mnist5k()
        tr, va, te = _three_way(len(y), seed)
        if n_train is not None:
            tr = tr[:n_train]
        return Split(X[tr], y[tr], None, X[va], y[va], None, X[te], y[te], None, name=name)
    if name in datasets.TABULAR:
        d = datasets.TABULAR[name](n_train=n_train, seed=seed)
        perm = np.random.default_rng(seed).permutation(len(d.y_test))
        va, te = perm[: len(perm) // 2], perm[len(perm) // 2 :]
        return Split(
            d.X_train, d.y_train, d.g_train, d.X_test[va], d.y_test[va], d.g_test[va],
            d.X_test[te], d.y_test[te], d.g_test[te], name=name, favourable=d.favourable,
        )  # fmt: skip
    raise ValueError(f"unknown data set {name!r}; built-in ones: {', '.join(BUILTIN)} (or pass --csv FILE)")


def load_csv(path: Path, label: str, group: str | None, features: str | None, seed: int = 0) -> Split:
    """The user's CSV, encoded as the module docstring says."""
    pd = require("pandas", "tabular")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CSV file {str(path)!r} does not exist")
    df = pd.read_csv(path)
    for col, flag in ((label, "--label"), (group, "--group")):
        if col is not None and col not in df.columns:
            raise ValueError(f"{flag} {col!r} is not a column of {path.name}; columns: {list(df.columns)}")
    cols = [c.strip() for c in features.split(",")] if features else [c for c in df.columns if c not in (label, group)]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"--features names unknown columns {missing}; columns: {list(df.columns)}")
    need = cols + [label] + ([group] if group else [])
    bad = df[need].isna().any(axis=1)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} rows of {path.name} have missing values (first at row {int(np.flatnonzero(bad)[0])}); "
            "fill or drop them first"
        )
    y_raw = df[label]
    levels = sorted(y_raw.unique().tolist())
    y = np.searchsorted(np.array(levels, dtype=object) if y_raw.dtype == object else np.array(levels), y_raw.to_numpy())
    g = None
    if group:
        g = np.unique(df[group].astype(str).to_numpy(), return_inverse=True)[1]
    tr, va, te = _three_way(len(df), seed)
    numeric = [c for c in cols if pd.api.types.is_numeric_dtype(df[c])]
    text = [c for c in cols if c not in numeric]
    parts = []
    if numeric:
        num = df[numeric].astype(float)
        mu, sd = num.iloc[tr].mean(), num.iloc[tr].std(ddof=0).replace(0.0, 1.0)
        parts.append((num - mu) / sd)
    if text:
        parts.append(pd.get_dummies(df[text].astype(str), prefix_sep="=").astype(float))
    X = pd.concat(parts, axis=1).to_numpy(np.float32)
    y = y.astype(np.int64)

    def sel(a, i):
        return None if a is None else a[i].astype(np.int64)

    return Split(X[tr], y[tr], sel(g, tr), X[va], y[va], sel(g, va), X[te], y[te], sel(g, te), name=path.stem)


def load(data: str | None, csv: Path | None, label: str | None, group: str | None, features: str | None,
         seed: int, n_train: int | None) -> Split:  # fmt: skip
    if (data is None) == (csv is None):
        raise ValueError("give exactly one of --data NAME (built-in) or --csv FILE")
    if csv is not None:
        if not label:
            raise ValueError("--csv needs --label COLUMN (the column holding the labels)")
        return load_csv(csv, label, group, features, seed)
    return load_builtin(data, seed, n_train)


def make_model_factory(arch: str, d_in: int, n_out: int, hidden: int = 64):
    """``lr`` (logistic / softmax regression) or ``mlp`` (one hidden ReLU layer)."""
    out = 1 if n_out == 2 else n_out
    if arch == "lr":
        return lambda: nn.Linear(d_in, out)
    if arch == "mlp":
        return lambda: nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, out))
    raise ValueError(f"--model must be 'lr' or 'mlp', got {arch!r}")


def write_json(out: Path, name: str, payload: dict[str, Any]) -> Path:
    """Write atomically: a half-written file never looks complete."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path


def save_figure(fig, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = out / (name + ".part.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path
