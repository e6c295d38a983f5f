"""Converting what users pass as data (tensors, numpy, pandas, Hugging Face datasets,
Datasets, DataLoaders) into tensors, and checking a loader's order."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from ..errors import DataError


def is_from(value: Any, package: str) -> bool:
    """Whether ``value``'s type comes from ``package`` (detected without importing it)."""
    return type(value).__module__.split(".")[0] == package


def _numpy_tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``arr``'s memory, or a copy when ``arr`` is read-only (arrow / pandas views)."""
    arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ in ("NAType", "NaTType")


def encode_labels(values: Any) -> tuple[torch.Tensor, list]:
    """Encode class labels of any sortable type (strings, say) as integers.

    Args:
        values: a 1-d sequence of labels: a list, numpy array, pandas Series
            or tensor.

    Returns:
        ``(codes, classes)``: ``codes`` a ``LongTensor`` ``(n,)`` with
        ``classes[codes[i]] == values[i]``; ``classes`` the distinct labels in
        sorted order (stable: the same classes always get the same codes).

    Raises:
        hessfree.errors.DataError: a missing value (``None`` / NaN), labels that
            are not 1-d, or labels of types that cannot be sorted together.
    """
    items = values.tolist() if hasattr(values, "tolist") else list(values)
    for i, v in enumerate(items):
        if _is_missing(v):
            raise DataError(f"encode_labels: the value at position {i} is missing ({v!r}); drop or fill it first")
        if isinstance(v, (list, tuple, dict)):
            raise DataError(f"encode_labels: the value at position {i} is a {type(v).__name__}; pass 1-d labels")
    try:
        classes = sorted(set(items))
    except TypeError as e:
        kinds = sorted({type(v).__name__ for v in items})
        raise DataError(f"encode_labels: the labels mix types that cannot be sorted ({kinds}); convert them to one type") from e
    index = {c: k for k, c in enumerate(classes)}
    return torch.tensor([index[v] for v in items], dtype=torch.long), classes


def _from_pandas(value: Any, what: str) -> torch.Tensor:
    """A pandas DataFrame as a float64 feature matrix ``(n, k)``; a Series ``(n,)``
    in its own dtype (labels stay integers)."""
    series = type(value).__name__ == "Series"
    frame = value.to_frame() if series else value
    for col, s in frame.items():
        kind = getattr(s.dtype, "kind", "O")
        if kind not in "biuf" or str(s.dtype) == "category":
            raise DataError(
                f"{what}: column {col!r} has dtype {s.dtype}; hessfree needs numbers. Encode it first: for class "
                f"labels codes, classes = hf.data.encode_labels(column) (codes are the labels), for features a numeric "
                "encoding (pandas.get_dummies, say)"
            )
        missing = s.isna().to_numpy()
        if missing.any():
            raise DataError(f"{what}: column {col!r} has a missing value at row {int(np.argmax(missing))}; fill or drop it")
    if series:  # labels (or weights) keep their dtype
        arr = frame.to_numpy(dtype=getattr(value.dtype, "numpy_dtype", value.dtype))
    else:  # a feature matrix: float64 (exact for integers below 2**53), cast to the model's dtype by the task
        arr = frame.to_numpy(dtype=np.float64)
    t = _numpy_tensor(arr)
    return t[:, 0] if series else t


def _hf_column(arr: Any, col: str, name: str) -> torch.Tensor:
    """One column of a ``datasets.Dataset`` (numpy format) as a tensor, or a named error."""
    arr = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr
    if arr.dtype.kind in "biuf":
        return _numpy_tensor(arr)
    first = next((v for v in arr.reshape(-1) if v is not None), None)
    if arr.dtype.kind in "US" or isinstance(first, (str, bytes)):
        raise DataError(
            f"{name}: column {col!r} holds strings, which tensors cannot hold; encode it into numeric columns "
            f"(tokenize text; class names: hf.data.encode_labels) and drop it with ds.remove_columns([{col!r}])"
        )
    if any(v is None for v in arr.reshape(-1)):
        i = next(k for k, v in enumerate(arr.reshape(-1)) if v is None)
        raise DataError(f"{name}: column {col!r} has a missing value at row {i}; fill or drop it (ds.filter)")
    if arr.dtype == object and (isinstance(first, (np.ndarray, list))):
        lengths = [len(v) for v in arr]
        spread = f"({min(lengths)} to {max(lengths)})" if min(lengths) != max(lengths) else "(inner lengths differ)"
        raise DataError(
            f"{name}: column {col!r} has rows of different lengths {spread}; pad them to one length "
            "(tokenizer(..., padding='max_length', max_length=...)), or pass "
            "DataLoader(ds, batch_size=..., shuffle=False, collate_fn=a padding collator such as "
            "transformers.DataCollatorWithPadding(tokenizer))"
        )
    raise DataError(
        f"{name}: column {col!r} holds {type(first).__name__} values, not numbers; convert it to arrays "
        f"(ds.map / ds.with_transform) or drop it with ds.remove_columns([{col!r}])"
    )


def from_hf_dataset(ds: Any, name: str) -> dict[str, torch.Tensor]:
    """The columns of a ``datasets.Dataset`` (those its format selects) as tensors, in its row order."""
    kind = type(ds).__name__
    if kind in ("DatasetDict", "IterableDatasetDict"):
        raise DataError(f"{name} is a {kind} with splits {list(ds)}; pass one split, e.g. ds['train']")
    if kind == "IterableDataset":
        raise DataError(
            f"{name} is a streaming datasets.IterableDataset, which has no length or fixed order; "
            "materialise it first: datasets.Dataset.from_list(list(ds.take(n)))"
        )
    fmt = getattr(ds, "format", None) or {}
    cols = list(ds.column_names) if fmt.get("output_all_columns") or not fmt.get("columns") else list(fmt["columns"])
    table = ds.with_format("numpy", columns=cols)[:]
    return {col: _hf_column(table[col], col, name) for col in cols}


def as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "USO":
            raise DataError(
                f"{what} is a numpy array of dtype {value.dtype}; hessfree needs numbers. Encode class labels "
                "with codes, classes = hf.data.encode_labels(values)"
            )
        return _numpy_tensor(value)
    if is_from(value, "pandas") and type(value).__name__ in ("DataFrame", "Series"):
        return _from_pandas(value, what)
    raise TypeError(
        f"{what} must be a torch.Tensor, numpy array or pandas DataFrame / Series, got {type(value).__name__}; "
        "convert it with torch.as_tensor(...)"
    )


def check_loader_order(loader: DataLoader, name: str) -> None:
    """Refuse a loader that does not yield examples ``0..n-1`` in order, once each."""
    fix = "pass the Dataset itself, or DataLoader(dataset, batch_size=..., shuffle=False)"
    if isinstance(loader.dataset, IterableDataset):
        raise DataError(
            f"{name}: the DataLoader reads an iterable-style dataset, which has no fixed length or order; "
            "pass a map-style Dataset or the tensors"
        )
    sampler = loader.sampler
    if isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)):
        raise DataError(
            f"{name}: the DataLoader uses {type(sampler).__name__}; influence scores are indexed by example "
            f"position, so {fix}"
        )
    if getattr(loader, "drop_last", False):
        raise DataError(f"{name}: the DataLoader has drop_last=True; set drop_last=False")
    batches = loader.batch_sampler
    if batches is None:
        raise DataError(f"{name}: the DataLoader has batch_size=None (no batching); give it a batch size")
    if type(batches) is BatchSampler and isinstance(batches.sampler, SequentialSampler) and not batches.drop_last:
        return  # 0..n-1 by construction
    n = len(loader.dataset)
    order = np.fromiter((int(i) for batch in batches for i in batch), dtype=np.int64)
    if len(order) != n:
        raise DataError(
            f"{name}: the DataLoader yields {len(order)} of the {n} examples of its dataset "
            f"({type(batches).__name__}); every example must come once, in order: {fix}"
        )
    wrong = np.nonzero(order != np.arange(n))[0]
    if wrong.size:
        p = int(wrong[0])
        raise DataError(
            f"{name}: the DataLoader yields example {int(order[p])} at position {p} "
            f"({type(batches).__name__} over {type(sampler).__name__}); scores are reported by position, so the "
            f"loader must yield examples 0..n-1 in order: {fix}"
        )
