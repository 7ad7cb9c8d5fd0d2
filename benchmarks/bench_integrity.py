"""What the integrity checks on read cost (issue 14): a feature store of ``--rows`` x ``--dim``
float32 train features (plus small val/test), written with and without the per-chunk CRC-32C;
times: writing it, reading the train split in full (``FeatureStore.read``), the streaming
verification a run makes when it first opens the store (``FeatureStore.verify``: every split
re-hashed, train labels counted), and ``np.load`` of the same features from one ``.npy`` as the
plain baseline. Best of ``--repeat`` wall times, seeded data, on the local disk.

    python benchmarks/bench_integrity.py --rows 100000 --dim 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

from longtail.storage.featurestore import FeatureStoreWriter, open_store, schema  # noqa: E402


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sizes = {"train": args.rows, "val": args.rows // 20, "test": args.rows // 10}
    feats = {s: rng.normal(size=(n, args.dim)).astype(np.float32) for s, n in sizes.items()}
    labels = {s: rng.integers(0, args.classes, n) for s, n in sizes.items()}
    for s in labels:
        labels[s][: args.classes] = np.arange(args.classes)
    root = tempfile.mkdtemp(prefix="bench-integrity-")
    try:
        npy = os.path.join(root, "train.npy")
        np.save(npy, feats["train"])
        baseline = _best(lambda: np.load(npy), args.repeat)
        print(f"{benchlib.cpu_name()}, {benchlib.cores()} cores")
        print(f"train {args.rows} x {args.dim} float32 ({feats['train'].nbytes / 2**20:.0f} MiB); "
              f"val {sizes['val']}, test {sizes['test']}; best of {args.repeat}")
        print(f"{'np.load(train.npy)':<48}{baseline:8.3f} s")
        for checksum in (False, True):
            schema.CHUNK_CHECKSUM = checksum
            url = os.path.join(root, f"s-{int(checksum)}.zarr")

            def write() -> None:
                shutil.rmtree(url, ignore_errors=True)
                _write(url, feats, labels, args.classes)

            t_write = _best(write, args.repeat)
            t_read = _best(lambda: open_store(url).read("train"), args.repeat)
            t_verify = _best(lambda: open_store(url).verify(), args.repeat)
            tag = "crc32c" if checksum else "no checksum (older stores)"
            print(f"{'write all splits, ' + tag:<48}{t_write:8.3f} s")
            print(f"{'read train, ' + tag:<48}{t_read:8.3f} s  ({t_read / baseline:.1f}x np.load)")
            print(f"{'verify all splits, ' + tag:<48}{t_verify:8.3f} s  ({t_verify / baseline:.1f}x np.load of train)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
