"""Scoring from the disk store against ``torch.mm`` on the same shapes in memory.

A store of ``--n`` (default 200,000) training rows of ``--dim`` (default 1,000) fp32
features is written the way ``fit`` writes one (batches of ``--batch`` rows, each with
its crc32), then ``Q`` queries (``--queries``, default 64 and 256) are scored against
every row:

* ``mm``: ``torch.mm(features, queries.T)`` with all ``n x dim`` features already in
  memory (one call; the speed limit);
* ``store``: :func:`hessfree.scoring.stream_scores` over ``GradientStore.blocks``
  (``--block`` rows per block, default 8192): every block read from the store's file
  and verified against the crc32 of each recorded batch it covers, then multiplied.

Both give the same ``(Q, n)`` fp32 scores (checked to 1e-4 relative). GFLOP/s counts
``2 * Q * dim * n`` floating-point operations; the ratio ``store / mm`` is the share of
the in-memory speed that scoring from disk keeps. Timings are the best of ``--repeat``
interleaved runs (a shared machine's load hits both alike). The store file is read
through the operating system's page cache (it was just written, so it is warm: the
numbers measure the store's read path, not the disk). ``--threads`` sets torch's
intra-op threads for both.

    python benchmarks/disk_scoring.py                       # 200,000 x 1,000, Q = 64 and 256
    python benchmarks/disk_scoring.py --n 20000 --repeat 2  # a quick look

Prints a table and writes ``benchmarks/results/disk_scoring.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hessfree.scoring import stream_scores
from hessfree.store import GradientStore

try:
    from hessfree.store._read import crc32 as _crc32
except ImportError:  # a version whose store checks with zlib
    from zlib import crc32 as _crc32


def write_store(path: Path, n: int, dim: int, batch: int, seed: int = 0) -> GradientStore:
    """A complete fp32 store of ``n`` random rows, written in batches of ``batch`` rows."""
    store = GradientStore.open(path, {"n": n, "dims": [dim], "dtype": "float32"})
    gen = torch.Generator().manual_seed(seed)
    records = []
    for s in range(0, n, batch):
        e = min(s + batch, n)
        records.append(store.write(0, s, torch.randn(e - s, dim, generator=gen), np.zeros(e - s)))
    store.record(0, 0, records)
    store.mark_complete()
    store.release()
    return GradientStore.open_existing(path)


def measure(store: GradientStore, feats: torch.Tensor, n_q: int, block: int, repeat: int) -> dict:
    n, dim = feats.shape
    queries = torch.randn(n_q, dim, generator=torch.Generator().manual_seed(1))
    out = np.empty((n_q, n), dtype=np.float32, order="F")
    res = torch.empty(n, n_q)
    t_store, t_mm = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        stream_scores(queries, store.blocks(0, 0, n, block), out)
        t_store.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.mm(feats, queries.T, out=res)
        t_mm.append(time.perf_counter() - t)
    np.testing.assert_allclose(out.T, res.numpy(), rtol=1e-4, atol=1e-4)
    flops = 2.0 * n_q * dim * n
    g_store, g_mm = flops / min(t_store) / 1e9, flops / min(t_mm) / 1e9
    return {
        "queries": n_q,
        "seconds_store": min(t_store),
        "seconds_mm": min(t_mm),
        "gflops_store": g_store,
        "gflops_mm": g_mm,
        "ratio": g_store / g_mm,
        "all_seconds_store": t_store,
        "all_seconds_mm": t_mm,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="training rows")
    ap.add_argument("--dim", type=int, default=1000, help="feature dimension")
    ap.add_argument("--queries", default="64,256", help="comma-separated numbers of query rows")
    ap.add_argument("--batch", type=int, default=256, help="rows per recorded batch (one crc32 each)")
    ap.add_argument("--block", type=int, default=8192, help="rows per scoring block (score_block_rows)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved runs; the best of each is kept")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--dir", default=None, help="folder for the temporary store (default: the system's)")
    ap.add_argument("--out", default="benchmarks/results/disk_scoring.json", help="JSON result ('' for none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="hf-disk-scoring-", dir=args.dir) as tmp:
        t = time.perf_counter()
        store = write_store(Path(tmp) / "store", args.n, args.dim, args.batch)
        write_s = time.perf_counter() - t
        feats = store.rows(0, 0, args.n)  # the same rows, held in memory (fp32)
        for n_q in [int(q) for q in args.queries.split(",")]:
            rows.append(measure(store, feats, n_q, args.block, args.repeat))
        del feats

    crc = f"{_crc32.__module__}.crc32"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"scoring {args.n:,} x {args.dim:,} fp32 features; blocks of {args.block} rows, batches of {args.batch}; "
          f"torch threads {args.threads} of {os.cpu_count()} cpus; best of {args.repeat}; checksums by {crc}; "
          f"load average {load_before[0] if load_before else '?':.1f} -> {load[0] if load else '?':.1f}")  # fmt: skip
    print(f"{'queries':>8} {'store s':>9} {'mm s':>8} {'store GFLOP/s':>14} {'mm GFLOP/s':>11} {'store / mm':>11}")
    for r in rows:
        print(f"{r['queries']:>8} {r['seconds_store']:>9.3f} {r['seconds_mm']:>8.3f} {r['gflops_store']:>14.1f} "
              f"{r['gflops_mm']:>11.1f} {r['ratio']:>11.2f}")  # fmt: skip
    if args.out:
        payload = {
            "n": args.n, "dim": args.dim, "batch": args.batch, "block": args.block, "repeat": args.repeat,
            "threads": args.threads, "store_write_seconds": write_s, "rows": rows, "crc32": crc,
            "load_average_before": load_before, "load_average_after": load,
            "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "argv": sys.argv[1:],
        }  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
