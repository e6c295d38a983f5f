"""Data, labels and output files of the ``hessfree noisy-labels / defend / fairness`` commands.

Data: a built-in data set by name (``--data``) or the user's CSV file
(``--csv``). CSV columns: the label (``--label``), optionally a group
(``--group``) and the features (``--features a,b,c``; default every other
column). Numeric features are standardised with the mean and deviation of the
rows the model trains on, text columns one-hot encoded. Every problem with the
file is reported when it is read, before any training: an empty file, a file
with a header and no data rows, a missing column, a missing or infinite value
(named by row and column), a label column that is not a class label (a
measurement with non-integer values, an identifier with about one row per
value, a single class).

Rows are numbered as pandas reads the file: ``row`` 0 is the first data line
after the header (blank lines are not counted). Every output that names a row
uses that number, and every label is written as it appears in the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_write, atomic_write_json
from ..errors import DataError
from .tables import (
    BUILTIN,
    BUILTIN_GROUPS,
    ROW_MEANING_CSV,
    CommandError,
    Labels,
    Table,
    builtin_table,
    class_labels,
    read_table,
)


@dataclass
class Split:
    """Train / validation / test parts of a :class:`Table` (features standardised on the train part).

    ``rows``, ``rows_v``, ``rows_t``: the source row number of each example.
    """

    x: np.ndarray
    y: np.ndarray
    g: np.ndarray | None
    rows: np.ndarray
    xv: np.ndarray
    yv: np.ndarray
    gv: np.ndarray | None
    rows_v: np.ndarray
    xt: np.ndarray
    yt: np.ndarray
    gt: np.ndarray | None
    rows_t: np.ndarray
    table: Table

    @property
    def name(self) -> str:
        return self.table.name

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = {"train": (self.x, self.y), "val": (self.xv, self.yv), "test": (self.xt, self.yt)}[part]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y), "validation": len(self.yv), "test": len(self.yt)}

    def row_numbers(self) -> dict[str, list[int]]:
        """The source rows of each part (for the JSON)."""
        return {"train": self.rows.tolist(), "validation": self.rows_v.tolist(), "test": self.rows_t.tolist()}


def split_table(t: Table, tr: np.ndarray, va: np.ndarray, te: np.ndarray) -> Split:
    x = t.standardised(tr)

    def g(i):
        return None if t.g is None else t.g[i]

    return Split(x[tr], t.y[tr], g(tr), t.rows[tr], x[va], t.y[va], g(va), t.rows[va], x[te], t.y[te], g(te), t.rows[te], t)


def three_way(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded 60% / 20% / 20% positions."""
    perm = np.random.default_rng(seed).permutation(n)
    a, b = int(0.6 * n), int(0.8 * n)
    return perm[:a], perm[a:b], perm[b:]


MIN_ROWS = 10


def check_n_train(n_train: int | None, available: int, what: str) -> None:
    if n_train is not None and not MIN_ROWS <= n_train <= available:
        raise CommandError(
            f"--n-train {n_train} is out of range: {what} has {available} rows, so use {MIN_ROWS} <= N <= {available} "
            "(or leave --n-train out to use them all)"
        )


def check_source(data: str | None, csv: Path | None, label: str | None, group: str | None, features: str | None,
                 n_train: int | None, command: str) -> None:  # fmt: skip
    """Flag combinations, before anything is loaded."""
    if (data is None) == (csv is None):
        raise CommandError("give exactly one of --data NAME (built-in: " + ", ".join(BUILTIN) + ") or --csv FILE")
    if csv is not None:
        if not label:
            raise CommandError("--csv needs --label COLUMN (the column holding the class labels)")
        if n_train is not None:
            raise CommandError("--n-train subsamples a built-in data set; with --csv pass the rows you want in the file")
        return
    for flag, value in (("--label", label), ("--features", features)):
        if value is not None:
            raise CommandError(f"{flag} {value!r} applies to --csv; the built-in {data!r} has its own label and features")
    if group is not None and group != BUILTIN_GROUPS.get(data):
        own = BUILTIN_GROUPS.get(data)
        which = f"its group is {own!r}" if own else "it has no groups"
        raise CommandError(f"--group {group!r} applies to --csv; the built-in {data!r} cannot change its group ({which})")


def load_split(data: str | None, csv: Path | None, label: str | None, group: str | None, features: str | None,
               seed: int, n_train: int | None) -> Split:  # fmt: skip
    """Train / validation / test split for ``defend`` and ``fairness``.

    CSV: a seeded 60/20/20 split of its rows. digits / mnist5k: the same split of
    the data set, ``--n-train`` keeping the first ``N`` training rows of it.
    Tabular: the loader's own train / test split, the test split halved into
    validation and test, ``--n-train`` a seeded subsample of the training split.
    """
    if csv is not None:
        t = read_table(csv, label, group, features)
        if len(t) < MIN_ROWS:
            raise DataError(f"{t.name} has {len(t)} data rows; these commands need at least {MIN_ROWS}")
        return split_table(t, *three_way(len(t), seed))
    t, n_tr = builtin_table(data, seed)
    if data in ("digits", "mnist5k"):
        tr, va, te = three_way(len(t), seed)
        check_n_train(n_train, len(tr), f"the training split of {data}")
        if n_train is not None:
            tr = tr[:n_train]
        return Split(t.x[tr], t.y[tr], None, t.rows[tr], t.x[va], t.y[va], None, t.rows[va], t.x[te], t.y[te], None,
                     t.rows[te], t)  # fmt: skip
    check_n_train(n_train, n_tr, f"the training split of {data}")
    tr = np.arange(n_tr)
    if n_train is not None:
        tr = np.sort(np.random.default_rng(seed).choice(n_tr, size=n_train, replace=False))
    perm = n_tr + np.random.default_rng(seed).permutation(len(t) - n_tr)
    va, te = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    # the loader standardised on its whole training split; subsampling keeps that scaling
    return Split(t.x[tr], t.y[tr], t.g[tr], t.rows[tr], t.x[va], t.y[va], t.g[va], t.rows[va], t.x[te], t.y[te],
                 t.g[te], t.rows[te], t)  # fmt: skip


def load_table(data: str | None, csv: Path | None, label: str | None, features: str | None, seed: int,
               n_train: int | None) -> tuple[Table, np.ndarray]:  # fmt: skip
    """Every row, for ``noisy-labels``: the table and the positions used
    (``--n-train``: a seeded subsample of that many rows of a built-in data set)."""
    if csv is not None:
        t = read_table(csv, label, None, features)
        if len(t) < MIN_ROWS:
            raise DataError(f"{t.name} has {len(t)} data rows; noisy-labels needs at least {MIN_ROWS}")
        return t, np.arange(len(t))
    t, _ = builtin_table(data, seed)
    check_n_train(n_train, len(t), data)
    if n_train is None:
        return t, np.arange(len(t))
    return t, np.sort(np.random.default_rng(seed).choice(len(t), size=n_train, replace=False))


def make_model_factory(arch: str, d_in: int, n_out: int, hidden: int = 64):
    """``lr`` (logistic / softmax regression) or ``mlp`` (one hidden ReLU layer)."""
    out = 1 if n_out == 2 else n_out
    if arch == "lr":
        return lambda: nn.Linear(d_in, out)
    if arch == "mlp":
        return lambda: nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, out))
    raise CommandError(f"--model must be 'lr' or 'mlp', got {arch!r}")


# ---- output files -----------------------------------------------------------------------------------


def prepare_out(out: Path) -> Path:
    """Create the output folder up front, so a bad ``--out`` fails before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {str(out)!r} is a file; pass a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"--out {str(out)!r} cannot be created ({e.strerror}); pass a folder you can write to") from e
    return out


def write_json(out: Path, name: str, payload: dict[str, Any]) -> Path:
    """``out/name``, written atomically."""
    Path(out).mkdir(parents=True, exist_ok=True)
    return atomic_write_json(Path(out) / name, payload)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or ImportError naming the ``plots`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("needs matplotlib: pip install 'hessfree[plots]'") from e
    return plt


def save_figure(fig, out: Path, name: str) -> Path:
    """``fig`` as a PNG at ``out/name``, written atomically."""
    Path(out).mkdir(parents=True, exist_ok=True)
    return atomic_write(Path(out) / name, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


__all__ = [
    "BUILTIN",
    "BUILTIN_GROUPS",
    "MIN_ROWS",
    "ROW_MEANING_CSV",
    "CommandError",
    "Labels",
    "Split",
    "Table",
    "builtin_table",
    "check_n_train",
    "check_source",
    "class_labels",
    "load_split",
    "load_table",
    "make_model_factory",
    "prepare_out",
    "pyplot",
    "read_table",
    "save_figure",
    "split_table",
    "three_way",
    "write_json",
]
