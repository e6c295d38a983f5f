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
from .batches import (
    Batch,
    batch_hash,
    batch_size_of,
    combine_hashes,
    map_batch,
    new_hash,
    slice_batch,
    to_device,
    update_hash,
)
from .convert import encode_labels
from .source import DataSource

__all__ = [
    "Batch",
    "DataSource",
    "batch_hash",
    "batch_size_of",
    "combine_hashes",
    "encode_labels",
    "map_batch",
    "new_hash",
    "slice_batch",
    "to_device",
    "update_hash",
]
