"""The arithmetic limits behind two floors of docs/scale.md, measured on this machine.

1. **The Fisher's Gram** ``Phi^T Phi`` (n x k features, float32 as stored): the library's way, LAPACK ``dsyrk``
   on float64 copies of each block (one triangle, ``n k^2`` flops), against ``torch.mm`` in float64 and in
   float32 (full products, ``2 n k^2`` flops). GFLOP/s count the flops each actually does, so ``dsyrk`` and
   ``mm`` compare as kernels; "seconds" is what the Gram costs each way.
2. **The store's checksums**: CRC-32 of a buffer by ``zlib`` and by ``isal`` (what the store uses), and
   xxHash-3 (a non-CRC hash, for reference, when ``xxhash`` is installed), in GB/s; and the time to map
   a file privately and checksum it, as a first read of the store does.

Best of ``--repeats`` runs, torch threads as ``--threads``.

    python benchmarks/kernels.py                     # n = 4000, k = 2048 and 4096, a 800 MB file
    python benchmarks/kernels.py --quick

Writes ``kernels.json`` and ``kernels.md`` into ``--out`` (default benchmarks/results/kernels).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from scipy.linalg.blas import dsyrk

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import markdown_table, write_json  # noqa: E402


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gram_rows(n: int, k: int, block: int, repeats: int) -> list[dict]:
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    blocks = [x[i : i + block] for i in range(0, n, block)]

    def syrk():
        g = np.zeros((k, k), order="F")
        for f in blocks:
            a = np.asarray(f.double().numpy(), order="C")
            g = dsyrk(1.0, a.T, beta=1.0, c=g, trans=0, lower=0, overwrite_c=1)

    def mm(dtype):
        def run():
            g = torch.zeros(k, k, dtype=dtype)
            for f in blocks:
                d = f.to(dtype)
                g.addmm_(d.T, d)

        return run

    rows = []
    for name, fn, flops in [("dsyrk, float64 (the library)", syrk, n * k * k),
                            ("torch.mm, float64", mm(torch.float64), 2 * n * k * k),
                            ("torch.mm, float32", mm(torch.float32), 2 * n * k * k)]:  # fmt: skip
        s = best(fn, repeats)
        rows.append({"kernel": name, "n": n, "k": k, "block": block, "seconds": s, "gflops": flops / s / 1e9})
    return rows


def checksum_rows(size: int, repeats: int) -> list[dict]:
    buf = np.random.default_rng(0).bytes(size)
    fns = [("crc32, zlib", lambda b: zlib.crc32(b))]
    try:
        from isal.isal_zlib import crc32 as isal_crc32

        fns.append(("crc32, isal (the store)", isal_crc32))
    except ImportError:
        pass
    try:
        import xxhash

        fns.append(("xxh3-64 (reference)", xxhash.xxh3_64_intdigest))
    except ImportError:
        pass
    rows = [{"hash": name, "bytes": size, "seconds": (s := best(lambda f=f: f(buf), repeats)), "gb_per_s": size / s / 1e9}
            for name, f in fns]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:  # a first read: private map + the store's checksum, page cache warm
        path = Path(tmp) / "rows.bin"
        path.write_bytes(buf)
        crc = fns[1][1] if len(fns) > 1 else fns[0][1]

        def mapped():
            m = np.memmap(path, dtype=np.uint8, mode="c")
            view = memoryview(m)
            for i in range(0, len(view), 64 << 20):
                crc(view[i : i + (64 << 20)])
            del view, m

        s = best(mapped, repeats)
        rows.append({"hash": "private map + crc32 (a first read)", "bytes": size, "seconds": s, "gb_per_s": size / s / 1e9})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4000, help="rows of the Gram (default 4000)")
    ap.add_argument("--k", type=int, nargs="+", default=[2048, 4096], help="feature sizes (default 2048 4096)")
    ap.add_argument("--block", type=int, default=4000, help="rows per block of the Gram (default 4000)")
    ap.add_argument("--bytes", type=int, default=800_000_000, help="checksummed bytes (default 800 MB: 200,000 x 1,000 float32)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="n = 1000, k = 512, 50 MB")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels")
    args = ap.parse_args()
    if args.quick:
        args.n, args.k, args.block, args.bytes = 1000, [512], 1000, 50_000_000
    torch.set_num_threads(args.threads)
    gram = [r for k in args.k for r in gram_rows(args.n, k, args.block, args.repeats)]
    sums = checksum_rows(args.bytes, args.repeats)
    text = ("## The Gram Phi^T Phi\n\n" + markdown_table(gram, ["kernel", "n", "k", "block", "seconds", "gflops"])
            + "\n\n## Checksums\n\n" + markdown_table(sums, ["hash", "bytes", "seconds", "gb_per_s"])
            + f"\n\ntorch threads: {args.threads}; best of {args.repeats}.\n")  # fmt: skip
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "kernels.json", {"threads": args.threads, "repeats": args.repeats, "gram": gram, "checksums": sums})
    (args.out / "kernels.md").write_text(text)


if __name__ == "__main__":
    main()
