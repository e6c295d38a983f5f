"""Tables of the ``hessfree`` commands: a built-in data set or the user's CSV file read into
features, class labels and groups, with every problem of the file reported when it is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import datasets
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
                f"row {r} is {float(vals[r]):g}): a class label must name a category, not a measurement. Choose the "
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
