"""The store's streamed reads (``GradientStore.blocks``) give exactly the rows that were
written, in blocks that stay valid, and still verify every batch they return."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessfree.scoring import accumulate_scores
from hessfree.store import GradientStore, StoreCorruptError
from hessfree.store import _read as read


def _store(path, sizes, dim=7, dtype="float32", seed=0):
    """A complete one-member store of batches of the given ``sizes``; returns it and the rows."""
    n = sum(sizes)
    store = GradientStore.open(path, {"n": n, "dims": [dim], "dtype": dtype})
    rows = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    records, s = [], 0
    for c in sizes:
        records.append(store.write(0, s, rows[s : s + c], np.zeros(c)))
        s += c
    store.record(0, 0, records)
    store.mark_complete()
    store.release()
    return GradientStore.open_existing(path), rows


@pytest.mark.parametrize("block", [1, 5, 16, 37, 1000])
def test_blocks_are_the_written_rows_at_any_block_size(tmp_path, block, monkeypatch):
    monkeypatch.setattr(read, "TASK_BYTES", 64)  # several tasks per block, and groups of batches
    sizes = [16, 16, 3, 40, 1, 16, 9]  # uneven batches: blocks cut through them
    store, rows = _store(tmp_path / "s", sizes)
    got = list(store.blocks(0, 2, 99, block))
    assert [s for s, _ in got] == list(range(2, 99, block))
    # every block is its own tensor: holding all of them keeps each one's rows
    torch.testing.assert_close(torch.cat([b for _, b in got]), rows[2:99], rtol=0, atol=0)
    torch.testing.assert_close(store.rows(0, 10, 60), rows[10:60], rtol=0, atol=0)


def test_half_precision_blocks_equal_the_rounded_rows(tmp_path):
    store, rows = _store(tmp_path / "s", [8, 8, 8], dtype="bfloat16")
    got = torch.cat([b for _, b in store.blocks(0, 0, 24, 5)])
    torch.testing.assert_close(got, rows.bfloat16().float(), rtol=0, atol=0)


def test_streamed_scores_equal_a_plain_product(tmp_path):
    store, rows = _store(tmp_path / "s", [32] * 10, dim=12)
    q = torch.randn(3, 12, dtype=torch.float64)
    out = torch.empty(320, 3, dtype=torch.float64)
    accumulate_scores(out, q.float(), store.blocks(0, 0, 320, 64), 1.0, fresh=True)
    np.testing.assert_allclose(out.numpy(), (rows.double() @ q.T).numpy(), rtol=1e-5, atol=1e-5)


def test_a_damaged_batch_is_found_when_a_later_block_reaches_it(tmp_path):
    store, rows = _store(tmp_path / "s", [16] * 6)
    f = tmp_path / "s" / "m0.features"
    raw = bytearray(f.read_bytes())
    raw[70 * 7 * 4 + 3] ^= 0xFF  # a byte of row 70: batch 64-79
    f.write_bytes(bytes(raw))
    blocks = store.blocks(0, 0, 96, 32)
    s, first = next(blocks)  # rows 0-31 are sound (the damaged rows are being read ahead)
    torch.testing.assert_close(first, rows[:32], rtol=0, atol=0)
    next(blocks)
    with pytest.raises(StoreCorruptError, match="rows 64-79 no longer match"):
        next(blocks)
    with pytest.raises(StoreCorruptError, match="rows 64-79"):
        store.rows(0, 70, 71)


def test_a_truncated_file_is_refused_before_reading(tmp_path):
    store, _ = _store(tmp_path / "s", [16] * 4)
    f = tmp_path / "s" / "m0.features"
    f.write_bytes(f.read_bytes()[: 40 * 7 * 4])
    with pytest.raises(StoreCorruptError, match="should have"):
        list(store.blocks(0, 0, 64, 16))


def test_stopping_early_leaves_no_reader_behind(tmp_path):
    store, rows = _store(tmp_path / "s", [16] * 8)
    blocks = store.blocks(0, 0, 128, 16)
    next(blocks)
    blocks.close()  # the read-ahead finishes before the file is closed
    torch.testing.assert_close(store.rows(0, 0, 128), rows, rtol=0, atol=0)


def test_the_checksum_is_zlibs_crc32():
    """Stores record zlib's CRC-32; the faster implementation must give the same values."""
    import zlib

    for size in (0, 1, 5000, 1 << 20):
        data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
        assert read.crc32(data) == zlib.crc32(data)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_reads_with_threads_of_its_own(tmp_path):
    import os

    store, rows = _store(tmp_path / "s", [16] * 4)
    torch.testing.assert_close(store.rows(0, 0, 64), rows, rtol=0, atol=0)  # the parent's threads exist now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's exit code carries the result
        ok = torch.equal(torch.cat([b for _, b in store.blocks(0, 0, 64, 16)]), rows)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def _count_checks(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = read.crc32

    def counted(data, *args):
        calls.append(len(memoryview(data).cast("B")))
        return real(data, *args)

    monkeypatch.setattr(read, "crc32", counted)
    return calls


def test_a_later_read_of_an_unchanged_file_checks_nothing_again(tmp_path, monkeypatch):
    store, rows = _store(tmp_path / "s", [16] * 6)
    calls = _count_checks(monkeypatch)
    torch.testing.assert_close(torch.cat([b for _, b in store.blocks(0, 0, 96, 32)]), rows, rtol=0, atol=0)
    assert len(calls) == 6  # each batch once, though blocks of 32 rows start inside batches
    torch.testing.assert_close(torch.cat([b for _, b in store.blocks(0, 0, 96, 40)]), rows, rtol=0, atol=0)
    torch.testing.assert_close(store.rows(0, 5, 50), rows[5:50], rtol=0, atol=0)
    assert len(calls) == 6
    again = GradientStore.open_existing(tmp_path / "s")  # a new object checks for itself
    torch.testing.assert_close(again.rows(0, 0, 96), rows, rtol=0, atol=0)
    assert len(calls) == 12


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_a_file_changed_after_a_sound_read_is_checked_again(tmp_path, keep_mtime):
    import os

    store, rows = _store(tmp_path / "s", [16] * 6)
    torch.testing.assert_close(store.rows(0, 0, 96), rows, rtol=0, atol=0)  # all found sound
    f = tmp_path / "s" / "m0.features"
    before = f.stat()
    with open(f, "r+b") as fh:  # one byte of row 40 (batch 32-47), in place: same inode and size
        fh.seek(40 * 7 * 4 + 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x01]))
    if keep_mtime:  # the modification time put back: the change time still differs
        os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert f.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(StoreCorruptError, match="rows 32-47 no longer match"):
        store.rows(0, 0, 96)
    with pytest.raises(StoreCorruptError, match="rows 32-47 no longer match"):
        list(store.blocks(0, 30, 50, 8))


def test_writing_to_a_block_never_changes_the_store(tmp_path):
    store, rows = _store(tmp_path / "s", [16] * 4)
    for _, block in store.blocks(0, 0, 64, 16):
        block.mul_(0.0)  # blocks are private copies-on-write of the file
    first = store.rows(0, 0, 64)
    first.add_(1.0)
    torch.testing.assert_close(store.rows(0, 0, 64), rows, rtol=0, atol=0)
    torch.testing.assert_close(GradientStore.open_existing(tmp_path / "s").rows(0, 0, 64), rows, rtol=0, atol=0)


def test_rows_are_a_copy_that_later_writes_to_the_file_never_reach(tmp_path):
    store, rows = _store(tmp_path / "s", [16] * 4)
    held = store.rows(0, 0, 64)
    with open(tmp_path / "s" / "m0.features", "r+b") as fh:  # another program rewrites the file in place
        fh.write(b"\0" * (64 * 7 * 4))
    torch.testing.assert_close(held, rows, rtol=0, atol=0)
    with pytest.raises(StoreCorruptError, match="no longer match"):
        store.rows(0, 0, 64)


def test_a_file_that_grew_is_refused_by_an_open_store_too(tmp_path):
    store, rows = _store(tmp_path / "s", [16] * 4)
    torch.testing.assert_close(store.rows(0, 0, 64), rows, rtol=0, atol=0)
    with open(tmp_path / "s" / "m0.features", "ab") as fh:
        fh.write(b"\0" * 16)
    with pytest.raises(StoreCorruptError, match=f"has {64 * 7 * 4 + 16} bytes but should have {64 * 7 * 4}"):
        list(store.blocks(0, 0, 64, 16))


def test_a_file_system_without_memory_maps_is_read_into_memory(tmp_path, monkeypatch):
    store, rows = _store(tmp_path / "s", [16, 9, 16, 23])

    def no_map(*args, **kwargs):
        raise OSError(19, "No such device")  # what mmap raises where the file system cannot map

    monkeypatch.setattr(read.np, "memmap", no_map)
    torch.testing.assert_close(torch.cat([b for _, b in store.blocks(0, 3, 60, 11)]), rows[3:60], rtol=0, atol=0)
    torch.testing.assert_close(store.rows(0, 0, 64), rows, rtol=0, atol=0)
    with open(tmp_path / "s" / "m0.features", "r+b") as fh:  # damage is still found
        fh.seek(30 * 7 * 4)
        fh.write(b"\xff\xff\xff\xff")
    with pytest.raises(StoreCorruptError, match="rows 25-40 no longer match"):
        store.rows(0, 0, 64)
