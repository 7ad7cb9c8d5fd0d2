"""What reading a feature store costs against ``np.load`` (issue 13, item 1), and what the
integrity checks cost (issue 14): a store of ``--rows`` x ``--dim`` float32 train features (plus
val and test of 1/20 and 1/10 the rows), written in each chunk layout the reader knows:

* ``raw + crc32c``: the layout of new stores (issue 13): chunks stored uncompressed, each followed
  by its CRC-32C, read straight from the chunk files into one preallocated array;
* ``blosc + crc32c``: stores written under issue 14 (Blosc LZ4, then the checksum), read through zarr;
* ``blosc``: stores written before checksums existed (their Blosc headers are checked instead).

Times: writing all splits, reading the train split in full (``FeatureStore.read``, a validated
FeatureSet) side by side with ``np.load`` of the same array from one ``.npy`` (alternating, in this
one process, so that both see the same machine), and the streaming verification a run makes when it
first opens the store (``FeatureStore.verify``: every split re-hashed, train labels counted).
Best of ``--repeat`` wall times, seeded data, on the local disk through the page cache.

    python benchmarks/bench_integrity.py --rows 100000 --dim 512
    python benchmarks/bench_integrity.py --rows 115846 --dim 2048   # the ImageNet-LT shape
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

from longtail.storage.featurestore import FeatureStoreWriter, open_store, schema  # noqa: E402

#: layout name -> (CHUNK_CHECKSUM, RAW_CHUNKS)
LAYOUTS = {"raw + crc32c": (True, True), "blosc + crc32c": (True, False), "blosc": (False, False)}


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _side_by_side(fns: list, repeat: int) -> list[float]:
    """Best of ``repeat`` rounds, each calling every function once in turn (its result dropped)."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            gc.collect()
            t0 = time.perf_counter()
            out = fn()
            times[i].append(time.perf_counter() - t0)
            del out
    return [min(t) for t in times]


def _write(url: str, feats: dict, labels: dict, classes: int) -> None:
    w = FeatureStoreWriter(url, class_names=[str(c) for c in range(classes)],
                           class_counts=np.bincount(labels["train"], minlength=classes), backbone={"kind": "bench"},
                           backbone_hash="b", dataset_fingerprint="d", feature_dim=feats["train"].shape[1],
                           splits={s: len(x) for s, x in feats.items()})
    for s in feats:
        w.begin_split(s)
        for i in range(0, len(feats[s]), 8192):
            w.write_chunk(s, feats[s][i:i + 8192], labels[s][i:i + 8192])
        w.end_split(s)
    w.finish()


def _disk(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of: {', '.join(LAYOUTS)}")
    args = ap.parse_args()
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    unknown = [s for s in layouts if s not in LAYOUTS]
    if unknown:
        ap.error(f"unknown layout(s): {', '.join(unknown)}")
    rng = np.random.default_rng(0)
    sizes = {"train": args.rows, "val": args.rows // 20, "test": args.rows // 10}
    feats = {s: rng.standard_normal(size=(n, args.dim), dtype=np.float32) for s, n in sizes.items()}
    labels = {s: rng.integers(0, args.classes, n) for s, n in sizes.items()}
    for s in labels:
        labels[s][: args.classes] = np.arange(args.classes)
    root = tempfile.mkdtemp(prefix="bench-integrity-")
    try:
        npy = os.path.join(root, "train.npy")
        np.save(npy, feats["train"])
        print(f"{benchlib.cpu_name()}, {benchlib.cores()} cores; 1-minute load average {os.getloadavg()[0]:.1f} "
              "before")
        print(f"train {args.rows} x {args.dim} float32 ({feats['train'].nbytes / 2**20:.0f} MiB); "
              f"val {sizes['val']}, test {sizes['test']}; best of {args.repeat}")
        for layout in layouts:
            saved = schema.CHUNK_CHECKSUM, schema.RAW_CHUNKS
            schema.CHUNK_CHECKSUM, schema.RAW_CHUNKS = LAYOUTS[layout]
            url = os.path.join(root, "s.zarr")

            def write() -> None:
                shutil.rmtree(url, ignore_errors=True)
                _write(url, feats, labels, args.classes)

            try:
                t_write = _best(write, args.repeat)
            finally:
                schema.CHUNK_CHECKSUM, schema.RAW_CHUNKS = saved
            store = open_store(url)
            store.read("train")  # opens the split's arrays once, as a run does
            t_read, t_load = _side_by_side([lambda: store.read("train"), lambda: np.load(npy)], args.repeat)
            t_verify = _best(lambda: open_store(url).verify(), args.repeat)
            print(f"{layout}: {_disk(url) / 1e6:,.0f} MB on disk")
            print(f"  {'write all splits':<34}{t_write:8.3f} s")
            print(f"  {'read train':<34}{t_read:8.3f} s  ({t_read / t_load:.2f}x np.load)")
            print(f"  {'np.load(train.npy), alternating':<34}{t_load:8.3f} s")
            print(f"  {'verify all splits':<34}{t_verify:8.3f} s  ({t_verify / t_load:.1f}x np.load of train)")
            shutil.rmtree(url, ignore_errors=True)
        print(f"1-minute load average {os.getloadavg()[0]:.1f} after", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
