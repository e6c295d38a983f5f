"""Turn what users pass as data into an ordered stream of batches.

Influence scores are indexed by position in the training data, so every data
source here is iterated in a fixed order, and shuffling loaders are refused.

Accepted forms:

* a tuple/list of tensors, numpy arrays or pandas objects ``(X, y)`` or
  ``(X, y, sample_weight)``, e.g. ``(df[feature_columns], df["label"])``
  (a DataFrame becomes a float64 feature matrix, a Series keeps its dtype;
  text columns are refused: encode labels with :func:`encode_labels`);
* a dict of tensors or arrays (for example ``input_ids``, ``attention_mask``,
  ``labels``);
* a Hugging Face ``datasets.Dataset``: its numeric columns become a dict of
  tensors named by column (name the label column as the task's ``label_key``,
  ``"labels"`` by default);
* a map-style ``torch.utils.data.Dataset`` (items are tuples or dicts);
* a ``torch.utils.data.DataLoader`` that yields examples ``0..n-1`` in order
  (``shuffle=False``; a custom batch sampler is fine if its order is that).

Neither ``pandas`` nor ``datasets`` is needed by hessfree; their objects are
recognised by type name.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
    default_collate,
)

from .errors import DataError

Batch = Union[tuple, dict]


def _from(value: Any, package: str) -> bool:
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


def _from_hf_dataset(ds: Any, name: str) -> dict[str, torch.Tensor]:
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


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "USO":
            raise DataError(
                f"{what} is a numpy array of dtype {value.dtype}; hessfree needs numbers. Encode class labels "
                "with codes, classes = hf.data.encode_labels(values)"
            )
        return _numpy_tensor(value)
    if _from(value, "pandas") and type(value).__name__ in ("DataFrame", "Series"):
        return _from_pandas(value, what)
    raise TypeError(
        f"{what} must be a torch.Tensor, numpy array or pandas DataFrame / Series, got {type(value).__name__}; "
        "convert it with torch.as_tensor(...)"
    )


def _check_loader_order(loader: DataLoader, name: str) -> None:
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


def batch_size_of(batch: Batch) -> int:
    """Number of examples in ``batch`` (the length of its first tensor)."""
    leaves = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            return int(leaf.shape[0])
    raise TypeError("a batch must hold at least one tensor")


def map_batch(batch: Batch, fn) -> Batch:
    """Apply ``fn`` to every tensor of a tuple or dict batch."""
    if isinstance(batch, Mapping):
        return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return tuple(fn(v) if isinstance(v, torch.Tensor) else v for v in batch)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return map_batch(batch, lambda t: t.to(device, non_blocking=True))


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    return map_batch(batch, lambda t: t[start:stop])


def _update_hash(h, item: Any) -> None:
    if isinstance(item, torch.Tensor):
        t = item.detach()
        h.update(f"T{tuple(t.shape)}{t.dtype}|".encode())
        t = t.to("cpu").contiguous().reshape(-1)
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the bytes as they are: no copy on the CPU
    elif isinstance(item, np.ndarray):
        _update_hash(h, torch.from_numpy(np.ascontiguousarray(item)))
    elif isinstance(item, Mapping):
        h.update(f"D{len(item)}|".encode())
        for k in sorted(item, key=str):
            h.update(f"K{k!r}|".encode())
            _update_hash(h, item[k])
    elif isinstance(item, (list, tuple)):
        h.update(f"L{len(item)}|".encode())
        for v in item:
            _update_hash(h, v)
    else:
        h.update(f"V{item!r}|".encode())


def new_hash():
    """The hash the library fingerprints data and tensors with: SHA-256, which
    processors with SHA instructions (recent x86 and ARM) run at about 1 GB/s,
    2-3 times blake2b's speed."""
    return hashlib.sha256()


def batch_hash(batch: Any) -> str:
    """A SHA-256 hash of everything in ``batch``: each tensor's dtype, shape and
    bytes (inputs, labels, sample weights), dict keys and the position of each
    item; any other value by its ``repr``. Equal batches give equal hashes on any
    machine; any changed value, label or weight gives another one.

    Returns:
        32 hexadecimal digits (the first 128 bits).
    """
    h = new_hash()
    _update_hash(h, batch)
    return h.hexdigest()[:32]


def combine_hashes(parts: list[tuple[int, int, str]]) -> str:
    """One hash of ``(offset, count, batch_hash)`` parts, taken in offset order:
    the hash of a whole data set cut into those batches."""
    h = new_hash()
    for o, c, part in sorted(parts):
        h.update(f"{o}:{c}:{part};".encode())
    return h.hexdigest()[:32]


class DataSource:
    """An ordered, re-iterable source of batches with a known length.

    Attributes:
        n: number of examples.
        batch_size: examples per batch (the last batch may be smaller).

    Raises:
        hessfree.errors.DataError: a loader that does not yield examples
            ``0..n-1`` in order (shuffled, a custom sampler or batch sampler
            with another order, ``drop_last=True``); a ``datasets.Dataset``
            column of strings, of rows of different lengths or of other
            non-numeric values; a pandas column of strings or with missing
            values; tensors with different numbers of rows.
        TypeError: data of an unsupported type.
    """

    def __init__(self, data: Any, batch_size: int = 256, name: str = "data"):
        if isinstance(data, DataSource):
            self._tensors, self._loader = data._tensors, data._loader
            self.n, self.name = data.n, data.name
            self.batch_size = batch_size
            return
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.name = name
        self._tensors: Batch | None = None
        self._loader: DataLoader | None = None
        if isinstance(data, (tuple, list)):
            tensors = tuple(_as_tensor(v, f"{name}[{i}]") for i, v in enumerate(data))
            self._check_lengths({f"{name}[{i}]": t for i, t in enumerate(tensors)})
            self._tensors = tensors
        elif isinstance(data, Mapping) and not _from(data, "datasets"):
            tensors = {k: _as_tensor(v, f"{name}[{k!r}]") for k, v in data.items()}
            self._check_lengths({f"{name}[{k!r}]": t for k, t in tensors.items()})
            self._tensors = tensors
        elif _from(data, "datasets"):
            tensors = _from_hf_dataset(data, name)
            self._check_lengths({f"{name}[{k!r}]": t for k, t in tensors.items()})
            self._tensors = tensors
        elif _from(data, "pandas"):
            raise TypeError(
                f"{name} is a pandas {type(data).__name__}; pass features and labels apart: "
                "(df[feature_columns], df[label_column])"
            )
        elif isinstance(data, DataLoader):
            _check_loader_order(data, name)
            self._loader = data
        elif isinstance(data, Dataset):
            if not hasattr(data, "__len__"):
                raise TypeError(f"{name}: an iterable-style Dataset has no length; pass a map-style one")
            self._loader = DataLoader(data, batch_size=self.batch_size, shuffle=False)
        else:
            raise TypeError(
                f"{name} must be (X, y) tensors, a dict of tensors, a Dataset or a DataLoader; "
                f"got {type(data).__name__}"
            )
        if self._loader is not None:
            self.n = len(self._loader.dataset)
        else:
            self.n = batch_size_of(self._tensors)
        if self.n == 0:
            raise ValueError(f"{name} is empty (0 examples); pass at least one example")

    @staticmethod
    def _check_lengths(named: dict[str, torch.Tensor]) -> None:
        lengths = {k: (int(t.shape[0]) if t.dim() > 0 else None) for k, t in named.items()}
        if any(v is None for v in lengths.values()):
            bad = [k for k, v in lengths.items() if v is None]
            raise ValueError(f"{bad[0]} is a scalar; every tensor needs one row per example")
        if len(set(lengths.values())) > 1:
            desc = ", ".join(f"{k} has {v} rows" for k, v in lengths.items())
            raise ValueError(
                f"length mismatch: {desc}; every tensor needs one row per example "
                "(check that features and labels come from the same split)"
            )

    def __len__(self) -> int:
        return self.n

    @property
    def in_memory(self) -> bool:
        """Whether the data is held as tensors (then :meth:`tensors` is free)."""
        return self._tensors is not None

    def tensors_without_loading(self) -> Batch | None:
        """All of the data as one batch when that needs no item to be loaded:
        tensor data, or a loader over a ``TensorDataset`` with the default
        collate function (its batches are slices of the dataset's tensors);
        ``None`` otherwise."""
        if self._tensors is not None:
            return self._tensors
        loader = self._loader
        if isinstance(loader.dataset, TensorDataset) and loader.collate_fn is default_collate:
            return tuple(loader.dataset.tensors)
        return None

    def __iter__(self) -> Iterator[Batch]:
        if self._tensors is not None:
            for start in range(0, self.n, self.batch_size):
                yield slice_batch(self._tensors, start, min(start + self.batch_size, self.n))
        else:
            for batch in self._loader:
                yield tuple(batch) if isinstance(batch, list) else batch

    def batches(self, start: int = 0) -> Iterator[tuple[int, Batch]]:
        """Yield ``(offset, batch)`` pairs from example ``start`` on."""
        offset = 0
        if self._tensors is not None:
            for s in range(start, self.n, self.batch_size):
                yield s, slice_batch(self._tensors, s, min(s + self.batch_size, self.n))
            return
        for batch in self:
            b = batch_size_of(batch)
            if offset + b > start:
                skip = max(0, start - offset)
                yield offset + skip, slice_batch(batch, skip, b) if skip else batch
            offset += b

    @property
    def fixed_batch_size(self) -> int | None:
        """Examples in every batch but the last: the batch size for tensors and for a
        loader with the default batch sampler (sequential, ``drop_last=False``);
        ``None`` for a loader with a custom batch sampler."""
        if self._tensors is not None:
            return self.batch_size
        sampler = getattr(self._loader, "batch_sampler", None)
        plain = type(sampler) is BatchSampler and isinstance(sampler.sampler, SequentialSampler) and not sampler.drop_last
        return sampler.batch_size if plain else None

    def batches_where(self, keep) -> Iterator[tuple[int, Batch]]:
        """Yield ``(offset, batch)`` for the batches whose index ``b`` passes ``keep(b)``.

        Tensor data is sliced. A loader with the default batch sampler loads only
        the kept batches (same dataset, collate function and workers); any other
        loader is iterated in full and the rest is skipped.
        """
        if self._tensors is not None:
            for b, s in enumerate(range(0, self.n, self.batch_size)):
                if keep(b):
                    yield s, slice_batch(self._tensors, s, min(s + self.batch_size, self.n))
            return
        bs = self.fixed_batch_size
        if bs is None:
            for b, (offset, batch) in enumerate(self.batches()):
                if keep(b):
                    yield offset, batch
            return
        loader = self._loader
        index_lists = [list(range(s, min(s + bs, self.n))) for b, s in enumerate(range(0, self.n, bs)) if keep(b)]
        if not index_lists:
            return
        sub = DataLoader(loader.dataset, batch_sampler=index_lists, collate_fn=loader.collate_fn,
                         num_workers=loader.num_workers, pin_memory=loader.pin_memory)  # fmt: skip
        for idx, batch in zip(index_lists, sub):
            yield idx[0], tuple(batch) if isinstance(batch, list) else batch

    def first_example(self) -> Batch:
        """The first example as a batch of one."""
        for batch in self:
            return slice_batch(batch, 0, 1)
        raise ValueError(f"{self.name} is empty")

    def tensors(self) -> Batch:
        """All of the data concatenated into one batch (for small held-out sets)."""
        if self._tensors is not None:
            return self._tensors
        parts = list(self)
        if isinstance(parts[0], Mapping):
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
