#!/usr/bin/env python
"""Random-row minibatch reads from a feature store against a memory-mapped ``np.load``.

Usage (from the repository root)::

    python benchmarks/bench_rows.py                  # print the section
    python benchmarks/bench_rows.py --write-readme   # also write it into README.md

For a split larger than memory a training loop reads minibatches of random rows.
``FeatureStore.read_rows`` serves them: the first read of a chunk reads it whole, checks its
CRC-32C and maps its file read-only; later reads of that chunk, while its file is unchanged,
gather their rows from the map. The
baseline is the plain way to do the same from a ``.npy`` of the features: ``np.load(path,
mmap_mode="r")[rows]`` for each batch.

What runs, on the seeded Gaussian stores of ``bench_stages.py`` (100 classes; 100,000 x 512 and
115,846 x 2,048 train rows, the ImageNet-LT train shape), in one process: one epoch of
``--batch``-row minibatches in a seeded random order is

1. **first epoch**: ``open_store(url).read_rows`` on a freshly opened store, so every chunk is
   read whole and checked once during it;
2. **later epochs**: the same store again (the chunks verified), alternating with
3. **baseline**: the same batches from ``np.load(npy, mmap_mode="r")``, features only (the store
   also returns the labels and the sample index of every row),

best of ``--repeats`` for 2 and 3. The files are in the page cache (written just before, no fsync):
this measures the reader's overhead, not a disk. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

from bench_stages import _gauss_store, _quiet_rounds  # noqa: E402
from benchlib import cores, cpu_name, fmt_s  # noqa: E402
from readme import write_section  # noqa: E402

START_MARKER = "<!-- perf-rows:start -->"
END_MARKER = "<!-- perf-rows:end -->"
COMMAND = "python benchmarks/bench_rows.py --write-readme"
SHAPES = ((100_000, 512), (115_846, 2_048))


def epoch_batches(rows: int, batch: int, seed: int = 0) -> list:
    import numpy as np

    order = np.random.default_rng(seed).permutation(rows)
    return [order[i:i + batch] for i in range(0, rows, batch)]


def measure(workdir: str, rows: int, dim: int, batch: int, repeats: int) -> dict:
    import numpy as np

    from longtail.storage.featurestore import open_store

    url, npy = _gauss_store(workdir, rows, dim)
    batches = epoch_batches(rows, batch)
    check = {}
    store = open_store(url)
    mm = np.load(npy, mmap_mode="r")

    def store_epoch():
        n = 0
        for b in batches:
            n += len(store.read_rows("train", b).features)
        check["store"] = n

    def npy_epoch():
        n = 0
        for b in batches:
            n += len(np.asarray(mm[b]))
        check["npy"] = n

    t = time.perf_counter()
    store_epoch()  # first epoch: every chunk read whole and checked once
    first = time.perf_counter() - t
    npy_epoch()  # warms the memory map like the store's first epoch warmed its caches
    (t_store, t_npy), _ = _quiet_rounds([store_epoch, npy_epoch], repeats, "cpu")
    assert check["store"] == check["npy"] == rows
    sample = batches[0][:7]
    np.testing.assert_array_equal(store.read_rows("train", sample).features, mm[sample])  # the same rows
    return {"rows": rows, "dim": dim, "batches": len(batches), "first": first, "store": min(t_store),
            "npy": min(t_npy)}


def render(results: list[dict], batch: int, total_s: float) -> str:
    lines = [
        f"Random-row minibatches (`{COMMAND}`): one epoch of {batch}-row batches in a seeded random order "
        "from the train split of a seeded Gaussian store, `store.read_rows(\"train\", rows)` (features, "
        "labels and sample index) against `np.load(npy, mmap_mode=\"r\")[rows]` of the same features "
        "(features only), in one process, files in the page cache; best of the alternating epochs after "
        "the first. The first epoch on a freshly opened store reads every chunk whole once and checks its "
        "CRC-32C and maps its file; later epochs gather their rows from those maps.",
        "",
        "| train split | batches | first epoch (store opened fresh) | later epoch | per batch | memory-mapped "
        "`np.load` | ratio (later epoch) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['rows']:,} x {r['dim']:,} float32 | {r['batches']:,} | {fmt_s(r['first'])} | "
                     f"{fmt_s(r['store'])} | {fmt_s(r['store'] / r['batches'])} | {fmt_s(r['npy'])} | "
                     f"**{r['store'] / r['npy']:.2f}x** |")
    lines += ["", f"_Measured {time.strftime('%Y-%m-%d')} on {cores()} CPU cores ({cpu_name()}); the whole script "
              f"took {total_s / 60:.1f} min. `{COMMAND}` regenerates this block._"]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256, help="rows per minibatch (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs of each (default 3)")
    p.add_argument("--small", action="store_true", help="the 100,000 x 512 store only")
    p.add_argument("--write-readme", action="store_true", help="write the block into README.md")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be at least 1")
    if args.small and args.write_readme:
        p.error("--small measures one shape: it does not write the README")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="bench-rows-")
    try:
        results = []
        for rows, dim in SHAPES[:1] if args.small else SHAPES:
            print(f"[rows] {rows:,} x {dim:,} ...", file=sys.stderr, flush=True)
            results.append(measure(workdir, rows, dim, args.batch, args.repeats))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    section = render(results, args.batch, time.perf_counter() - t0)
    print(section)
    if args.write_readme:
        write_section(START_MARKER, END_MARKER, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
