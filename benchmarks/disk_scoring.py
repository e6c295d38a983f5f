"""Scoring from the disk store against ``torch.mm`` on the same shapes in memory.

``fit`` writes a store of ``--n`` (default 200,000) training rows of ``--dim``
(default 1,000) fp32 features: the per-example gradients of a linear regression
``nn.Linear(dim, 1, bias=False)`` on random data (batches of ``--batch`` rows, each
with its crc32). Then ``Q`` test examples (``--queries``, default 64 and 256) are
scored against every row by the library's own path, ``est.pairwise(test)``:

* ``mm``: ``torch.mm(features, queries.T)`` with all ``n x dim`` features already in
  memory and the queries already computed (one call, a new output; the speed limit);
* ``first call``: ``pairwise`` of an estimator just reopened on the store
  (``fit()``): the file is memory-mapped and every recorded batch is checked against
  its crc32 before its rows are multiplied (``score_block_rows`` rows at a time);
* ``later calls``: ``pairwise`` again on the same estimator; batches it found sound
  are not checked again while the file's identity (inode, size, modification and
  change times) stays the same;
* ``top_k(10) later``: ``est.top_k(test, 10)`` on the same estimator (the same stream,
  a running top-10 instead of the full matrix; checked against sorting ``pairwise``).

``pairwise`` also computes the Q test gradients (timed alone in the column "test
gradients s"; part of its time, not of ``mm``'s) and returns float32 scores. All give the
same ``(Q, n)`` scores (checked to 1e-4 relative). GFLOP/s counts ``2 * Q * dim * n``
floating-point operations; "speed first / mm" is the GFLOP/s of a first call divided by
that of ``mm`` (its seconds divided by the call's): the share of the in-memory speed that
scoring from disk keeps, 1 = as fast, below 1 = slower. Timings are the best of
``--repeat`` interleaved runs (a shared machine's load hits all alike); the ratio of
the medians is printed too. The store file is read through the operating system's
page cache (it was just written, so it is warm: the numbers measure the store's read
path, not the disk). ``--threads`` sets torch's intra-op threads for all.

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

import hessfree as hf
from hessfree.store import GradientStore

try:
    from hessfree.store._read import crc32 as _crc32
except ImportError:  # a version whose store checks with zlib
    from zlib import crc32 as _crc32


def reopen(task, path: Path, block: int) -> hf.Influence:
    est = hf.Influence(task, store=path).fit()  # a complete store: no training data needed
    est.score_block_rows = block
    return est


def measure(task, path: Path, feats: torch.Tensor, n_q: int, block: int, repeat: int) -> dict:
    n, dim = feats.shape
    gen = torch.Generator().manual_seed(n_q)
    test = (torch.randn(n_q, dim, generator=gen), torch.randn(n_q, generator=gen))
    est = reopen(task, path, block)
    queries = est.query_features(test)  # (Q, dim): the rows pairwise multiplies by
    scores = est.pairwise(test)  # this estimator has now checked every batch
    times: dict[str, list[float]] = {"first": [], "later": [], "mm": [], "queries": [], "top_k": []}
    for _ in range(repeat):
        fresh = reopen(task, path, block)  # a new estimator checks every batch again
        t = time.perf_counter()
        fresh.pairwise(test)
        times["first"].append(time.perf_counter() - t)
        t = time.perf_counter()
        scores = est.pairwise(test)
        times["later"].append(time.perf_counter() - t)
        t = time.perf_counter()
        res = torch.mm(feats, queries.T)
        times["mm"].append(time.perf_counter() - t)
        t = time.perf_counter()
        est.query_features(test)
        times["queries"].append(time.perf_counter() - t)
        t = time.perf_counter()
        top = est.top_k(test, 10)
        times["top_k"].append(time.perf_counter() - t)
    np.testing.assert_allclose(scores, res.T.double().numpy(), rtol=1e-4, atol=1e-4 * float(res.abs().max()))
    np.testing.assert_allclose(top.scores, -np.sort(-scores, axis=1)[:, :10], rtol=1e-4, atol=1e-4 * float(res.abs().max()))
    flops = 2.0 * n_q * dim * n
    row = {"queries": n_q}
    for k, ts in times.items():
        row[f"seconds_{k}"] = min(ts)
        row[f"median_seconds_{k}"] = float(np.median(ts))
        row[f"all_seconds_{k}"] = ts
        if k not in ("queries", "top_k"):
            row[f"gflops_{k}"] = flops / min(ts) / 1e9
    for k in ("first", "later"):
        row[f"ratio_{k}"] = row[f"gflops_{k}"] / row["gflops_mm"]
        row[f"median_ratio_{k}"] = row["median_seconds_mm"] / row[f"median_seconds_{k}"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="training rows")
    ap.add_argument("--dim", type=int, default=1000, help="feature dimension")
    ap.add_argument("--queries", default="64,256", help="comma-separated numbers of test examples")
    ap.add_argument("--batch", type=int, default=256, help="rows per recorded batch (one crc32 each)")
    ap.add_argument("--block", type=int, default=8192, help="rows per scoring block (score_block_rows)")
    ap.add_argument("--repeat", type=int, default=7, help="interleaved runs; the best and the median are kept")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--dir", default=None, help="folder for the temporary store (default: the system's)")
    ap.add_argument("--out", default="benchmarks/results/disk_scoring.json", help="JSON result ('' for none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="hf-disk-scoring-", dir=args.dir) as tmp:
        torch.manual_seed(0)
        task = hf.RegressionTask(torch.nn.Linear(args.dim, 1, bias=False))
        train = (torch.randn(args.n, args.dim), torch.randn(args.n))
        path = Path(tmp) / "store"
        t = time.perf_counter()
        hf.Influence(task, batch_size=args.batch, store=path).fit(train)
        write_s = time.perf_counter() - t
        feats = GradientStore.open_existing(path).rows(0, 0, args.n).clone()  # the same rows, held in memory
        assert feats.shape == (args.n, args.dim), feats.shape
        for n_q in [int(q) for q in args.queries.split(",")]:
            rows.append(measure(task, path, feats, n_q, args.block, args.repeat))
        del feats

    crc = f"{_crc32.__module__}.crc32"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"est.pairwise from a store of {args.n:,} x {args.dim:,} fp32 features; blocks of {args.block} rows, "
          f"batches of {args.batch}; torch threads {args.threads} of {os.cpu_count()} cpus; best of {args.repeat}; "
          f"checksums by {crc}; load average {load_before[0] if load_before else '?':.1f} -> "
          f"{load[0] if load else '?':.1f}")  # fmt: skip
    print("times are the best of the runs; speed = GFLOP/s relative to torch.mm in memory (1 = as fast)")
    head = ["queries", "first call s", "later calls s", "torch.mm s", "test gradients s", "speed first / mm",
            "speed later / mm", "median: first / mm", "median: later / mm", "top_k(10) later s"]
    print("  ".join(head))
    for r in rows:
        cells = [r["queries"], *(f"{r[k]:.3f}" for k in ("seconds_first", "seconds_later", "seconds_mm", "seconds_queries")),
                 *(f"{r[k]:.2f}" for k in ("ratio_first", "ratio_later", "median_ratio_first", "median_ratio_later")),
                 f"{r['seconds_top_k']:.3f}"]
        print("  ".join(f"{c:>{len(h)}}" for c, h in zip(cells, head)))
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
