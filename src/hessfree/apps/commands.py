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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import datasets
from .._io import atomic_write, atomic_write_json
from ..datasets._require import require
from ..errors import DataError, HessfreeError, LabelError

BUILTIN = ("digits", "mnist5k", "adult", "compas", "german")
# the group each built-in tabular data set comes with (it cannot be changed with --group)
BUILTIN_GROUPS = {"adult": "sex", "compas": "race", "german": "sex"}
ROW_MEANING_CSV = "0-based data row of the CSV file: row 0 is the first line after the header (blank lines not counted)"


class CommandError(HessfreeError, ValueError):
    """A flag or a combination of flags that cannot work; the message names the flag, the value and the fix."""


# ---- labels ---------------------------------------------------------------------------------------


@dataclass
class Labels:
    """Integer codes of a label column and what they stand for.

    Attributes:
        column: the column (or the built-in data set's label).
        classes: the label of each code, as in the file (``classes[code]``);
            integers for integer-valued numbers, strings for text.
    """

    column: str
    classes: list

    def name(self, code: int) -> Any:
        return self.classes[int(code)]

    def names(self, codes: Any) -> list:
        return [self.classes[int(c)] for c in np.asarray(codes).reshape(-1)]

    def code_of(self, text: str, flag: str) -> int:
        """The code of the class written ``text`` (how a user types it on the command line)."""
        for k, c in enumerate(self.classes):
            if str(c) == text:
                return k
        raise CommandError(
            f"{flag} {text!r} is not a class of {self.column!r}; its classes are "
            f"{', '.join(repr(str(c)) for c in self.classes)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"column": self.column, "classes": list(self.classes), "codes": {str(c): k for k, c in enumerate(self.classes)}}


def _python(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def class_labels(values: Any, column: str, source: str) -> tuple[np.ndarray, Labels]:
    """Encode a label column as class codes, refusing what is not a class label.

    Args:
        values: the column (a pandas Series, missing values already refused).
        column: its name (for messages).
        source: the file name (for messages).

    Raises:
        LabelError: non-integer numbers (a measurement), about one row per value
            (an identifier), or a single class.
    """
    n = len(values)
    kind = getattr(values.dtype, "kind", "O")
    if kind == "b":
        from ..data import encode_labels

        codes_t, classes = encode_labels(values.to_numpy())
        codes = codes_t.numpy()
    elif kind in "iuf":
        vals = values.to_numpy(dtype=float)
        frac = np.flatnonzero(vals != np.round(vals))
        if frac.size:
            r = int(frac[0])
            raise LabelError(
                f"--label {column!r} of {source} holds non-integer numbers ({values.nunique()} distinct values; "
                f"row {r} is {vals[r]!r}): a class label must name a category, not a measurement. Choose the "
                "column of classes, or bin this one into classes first (for example with pandas.cut)"
            )
        uniq, codes = np.unique(vals, return_inverse=True)
        # integers stay integers; a float column keeps its floats (1.0), as the file writes them
        classes = [int(u) for u in uniq] if kind in "iu" else [float(u) for u in uniq]
    else:
        from ..data import encode_labels

        codes_t, classes = encode_labels(values.astype(str).to_numpy())
        codes = codes_t.numpy()
    k = len(classes)
    if k < 2:
        raise LabelError(
            f"--label {column!r} of {source} has one class ({_python(classes[0])!r}) in all {n} rows: there is "
            "nothing to tell apart. Choose a label column with at least two classes"
        )
    if 2 * k > n:
        raise LabelError(
            f"--label {column!r} of {source} has {k} distinct values in {n} rows (fewer than 2 rows per class): "
            "it looks like an identifier or a measurement, not a class label. Choose the column of classes"
        )
    return codes.astype(np.int64), Labels(column, [_python(c) for c in classes])


# ---- the data of one command run ----------------------------------------------------------------


@dataclass
class Table:
    """Encoded rows of one data set, before any split.

    Attributes:
        x: ``(n, d)`` float32 features (standardised later, per split).
        y: ``(n,)`` int64 class codes.
        g: ``(n,)`` int64 group codes or ``None``.
        rows: ``(n,)`` the row number of each example in the source.
        labels: what the class codes stand for.
        groups: what the group codes stand for (or ``None``).
        name: the data set or file name.
        row_meaning: what ``rows`` number, in words (written to the JSON).
        numeric: which feature columns to standardise (the others are one-hot).
        favourable: the favourable class code of a built-in data set.
    """

    x: np.ndarray
    y: np.ndarray
    g: np.ndarray | None
    rows: np.ndarray
    labels: Labels
    groups: Labels | None
    name: str
    row_meaning: str
    numeric: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    favourable: int | None = None
    row_short: str = ""

    def __len__(self) -> int:
        return len(self.y)

    def standardised(self, fit_rows: np.ndarray) -> np.ndarray:
        """Features with the numeric columns standardised by the mean and (population)
        deviation over ``fit_rows`` (positions; a constant column is left centred)."""
        x = self.x.astype(np.float64)
        if self.numeric.any():
            cols = np.flatnonzero(self.numeric)
            mu = x[np.ix_(fit_rows, cols)].mean(0)
            sd = x[np.ix_(fit_rows, cols)].std(0)
            sd[sd == 0] = 1.0
            x[:, cols] = (x[:, cols] - mu) / sd
        return x.astype(np.float32)


def _read_csv(path: Path):
    pd = require("pandas", "tabular")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--csv {str(path)!r}: the file does not exist")
    if path.is_dir():
        raise DataError(f"--csv {str(path)!r} is a folder; pass a CSV file")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError as e:
        raise DataError(f"--csv {path.name}: the file is empty (no header, no data rows)") from e
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"--csv {path.name} cannot be read as CSV: {detail}") from e
    if len(df) == 0:
        raise DataError(
            f"--csv {path.name} has no data rows (only the header: {', '.join(map(str, df.columns))}); "
            "add rows below the header"
        )
    return pd, df


def _columns(df, path: Path, label: str, group: str | None, features: str | None) -> list[str]:
    have = [str(c) for c in df.columns]
    for col, flag in ((label, "--label"), (group, "--group")):
        if col is not None and col not in df.columns:
            raise DataError(f"{flag} {col!r} is not a column of {path.name}; its columns are: {', '.join(have)}")
    if group is not None and group == label:
        raise CommandError(f"--group {group!r} is the label column; pass the column of the sensitive attribute")
    if features:
        cols = [c.strip() for c in features.split(",") if c.strip()]
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise DataError(f"--features names columns that {path.name} lacks: {missing}; its columns are: {', '.join(have)}")
        clash = [c for c in cols if c in (label, group)]
        if clash:
            raise CommandError(f"--features includes {clash}, the label or group column; leave it out")
        dup = sorted({c for c in cols if cols.count(c) > 1})
        if dup:
            raise CommandError(f"--features names {dup} twice; name each column once")
    else:
        cols = [c for c in df.columns if c not in (label, group)]
    if not cols:
        raise DataError(f"{path.name} has no feature columns besides the label and group; add some or fix --features")
    return cols


def _check_values(pd, df, cols: list[str], path: Path) -> None:
    """Refuse missing and infinite values, naming the first by row and column."""
    sub = df[cols]
    miss = sub.isna().to_numpy()
    if miss.any():
        r, c = np.argwhere(miss)[0]
        raise DataError(
            f"{path.name}: {int(miss.any(axis=1).sum())} rows have missing values (first: row {int(r)}, column "
            f"{cols[int(c)]!r}); fill or drop them first (row 0 is the first line after the header)"
        )
    numeric = [c for c in cols if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    if numeric:
        vals = df[numeric].to_numpy(dtype=float)
        bad = np.isinf(vals)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DataError(
                f"{path.name}: {int(bad.any(axis=1).sum())} rows have infinite values (first: row {int(r)}, column "
                f"{numeric[int(c)]!r} is {vals[r, c]}); replace them with finite numbers or drop the rows "
                "(row 0 is the first line after the header)"
            )


def read_table(path: Path, label: str, group: str | None, features: str | None) -> Table:
    """The user's CSV, checked and encoded (see the module docstring)."""
    path = Path(path)
    pd, df = _read_csv(path)
    cols = _columns(df, path, label, group, features)
    _check_values(pd, df, cols + [label] + ([group] if group else []), path)
    y, labels = class_labels(df[label], label, path.name)
    g = groups = None
    if group:
        g_codes, g_classes = np.unique(df[group].astype(str).to_numpy(), return_inverse=True)
        g, groups = g_classes.astype(np.int64), Labels(group, [str(v) for v in g_codes])
    parts, numeric = [], []
    for c in cols:
        s = df[c]
        if pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
            parts.append(s.astype(float).to_frame())
            numeric.append(not pd.api.types.is_bool_dtype(s))
        else:
            dummies = pd.get_dummies(s.astype(str), prefix=str(c), prefix_sep="=").astype(float)
            parts.append(dummies)
            numeric.extend([False] * dummies.shape[1])
    x = pd.concat(parts, axis=1).to_numpy(np.float32)
    return Table(
        x=x, y=y, g=g, rows=np.arange(len(df)), labels=labels, groups=groups, name=path.name,
        row_meaning=f"{ROW_MEANING_CSV} ({path.name})", numeric=np.asarray(numeric, dtype=bool),
        row_short="row 0 = the first line after the header",
    )  # fmt: skip


def _digit_labels(name: str) -> Labels:
    return Labels(f"{name} digit", list(range(10)))


def builtin_table(name: str, seed: int) -> tuple[Table, int]:
    """Every row of a built-in data set as one table, and the size of its own
    training split (tabular: rows ``0..n_train-1`` are the loader's training
    split, the rest its test split)."""
    if name in ("digits", "mnist5k"):
        X, y = datasets.digits() if name == "digits" else datasets.mnist5k()
        fn = "digits" if name == "digits" else "mnist5k"
        return Table(
            x=X, y=y.astype(np.int64), g=None, rows=np.arange(len(y)), labels=_digit_labels(name), groups=None,
            name=name, row_meaning=f"index into hessfree.datasets.{fn}() (the loader's order)",
            row_short=f"row = index into hessfree.datasets.{fn}()",
        ), len(y)  # fmt: skip
    d = datasets.TABULAR[name](seed=seed)
    x = np.concatenate([d.X_train, d.X_test])
    return Table(
        x=x, y=np.concatenate([d.y_train, d.y_test]).astype(np.int64),
        g=np.concatenate([d.g_train, d.g_test]).astype(np.int64), rows=np.arange(len(x)),
        labels=Labels(f"{name} label", [0, 1]), groups=Labels(BUILTIN_GROUPS[name], list(d.group_names)), name=name,
        row_meaning=f"index into concatenate([X_train, X_test]) of hessfree.datasets.{name}(seed={seed})",
        favourable=int(d.favourable), row_short=f"row = index into the {name} loader's train + test rows",
    ), len(d.y_train)  # fmt: skip


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
