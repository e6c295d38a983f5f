"""On-disk store of per-example training features (projected gradients), one per member.

Layout of a store folder::

    meta.json              format, configuration + fingerprints, state; the data hash once complete
    m{m}.features          (n, dim_m) raw array (numpy memmap), fp32 / fp16 / bf16
    m{m}.sqnorm            (n,) float64 squared feature norms (computed in fp32 before rounding)
    example.pt             the estimator's probe: the first two training examples, cloned
    progress/m{m}.r{r}.json  the batches rank r has written and flushed:
                           [offset, count, data hash, features crc32, sqnorm crc32] each
    .lock                  the writer's lock (``fcntl.flock``) and its process id

Crash safety. ``meta.json`` is written first (state ``"allocating"``), then
the space of every file is reserved, ``example.pt`` is saved, and the state
becomes ``"writing"``. Rows are written to the memmap and flushed *before*
their batch is added to the rank's progress file (replaced atomically), and
``"complete": true`` is written only after every row of every member is
covered. A run killed at any point therefore resumes from the last recorded
batch and gives the same arrays as an uninterrupted run; a folder left by a
run killed before its first ``meta.json`` (only temporary files, the lock, an
empty ``progress/``) is created anew, and a half-written store is never taken
for a complete one.

What is checked. The configuration holds the model, the parameter
selection, the projection, the members, the storage dtype, the estimator, the
task and its options, and the per-example losses of the stored examples
(rounded, compared to a relative 1e-4). Every written batch records a hash of
its data (inputs, labels, sample weights); the complete store records one hash
of all of them. Reopening with data hashes the data again, so any changed
value is found (:class:`StoreMismatchError`, naming the rows). Each written
batch also records crc32 checksums of its stored bytes, verified the first time
a store object reads the rows and again whenever the file's inode, size,
modification or change time differs, and every file's size is checked on open
(:class:`StoreCorruptError`). The space of the files is reserved when the
store is created (:class:`StoreFullError` names the bytes needed and free), a
second writer is refused (:class:`StoreLockedError`, naming the writing
process), and a store of an earlier format is refused with the advice to
rebuild it (:class:`StoreFormatError`).
"""

from .errors import (
    REBUILD,
    StoreCorruptError,
    StoreError,
    StoreFormatError,
    StoreFullError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
)
from .fingerprints import LOSS_RTOL, fingerprint_data, fingerprint_tensors, losses_match, rounded_losses
from .gradient_store import DTYPES, FORMAT, GradientStore

__all__ = [
    "DTYPES",
    "FORMAT",
    "LOSS_RTOL",
    "REBUILD",
    "GradientStore",
    "StoreCorruptError",
    "StoreError",
    "StoreFormatError",
    "StoreFullError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "fingerprint_data",
    "fingerprint_tensors",
    "losses_match",
    "rounded_losses",
]
