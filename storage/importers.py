"""Import user feature files into a feature store (``longtail import-features``).

Accepted files, one per split (the DLSA reference code's format):

* ``.npz`` (numpy) or ``.h5`` / ``.hdf5`` (HDF5, datasets at the root) holding
  ``features`` ``(N, D)`` numbers, ``labels`` ``(N,)`` integers (integer-valued floats are
  accepted; ``(N, 1)`` is flattened) and optionally ``attributes`` ``(N,)`` integers >= 0.

Unlabelled splits (deployment features for prior estimation, an unlabelled val or test): where a
split's labels are optional, a file without ``labels`` is an unlabelled split. Such a file must
hold nothing but ``features`` (and ``attributes``): a file without ``labels`` but with another
key (``targets``, ``y``) more likely names its labels differently than has none, and is refused
with the "missing key 'labels'" error instead of silently losing its labels.

Every problem with a file raises :class:`~stages.errors.LongtailError` whose one-line message
names the file. HDF5 features are streamed in row blocks (a file larger than memory imports
fine); an ``.npz`` member cannot be sliced, so its features are loaded whole.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from longtail.stages.errors import LongtailError
from longtail.storage.featurestore import SPLIT_NAME, FeatureStore, FeatureStoreWriter, open_store, store_status
from longtail.storage.locks import DEFAULT_TIMEOUT
from longtail.storage.fs import check_access, file_hash, is_local, json_hash

EXTENSIONS = (".npz", ".h5", ".hdf5")
KEYS = ("features", "labels", "attributes")
#: the splits import_features names itself; ``extra`` splits may not reuse these names
_FIXED_SPLITS = ("train", "val", "test")
#: uncompressed bytes of features read at a time from an HDF5 file
_BLOCK_BYTES = 64 << 20


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


class _FeatureFile:
    """One open feature file: validated metadata, small arrays in memory, features by blocks."""

    def __init__(self, path: str, require_labels: bool = True) -> None:
        self.path = str(path)
        self.require_labels = bool(require_labels)
        self._h5 = None
        self._npz = None
        self._handle = None  # an open fsspec file for a remote URL
        fs, fpath = check_access(self.path)
        if not fs.exists(fpath):
            raise LongtailError(f"{self.path}: feature file not found")
        if fs.isdir(fpath):
            raise LongtailError(f"{self.path}: is a directory, not a feature file")
        ext = os.path.splitext(self.path)[1].lower()
        if ext not in EXTENSIONS:
            raise LongtailError(
                f"{self.path}: unsupported feature file extension {ext or '(none)'!r} (expected .npz, .h5 or .hdf5)"
            )
        try:
            # a local file is opened by path; a remote one through fsspec (read lazily, block by block)
            source = fpath if is_local(fs) else fs.open(fpath, "rb")
            self._handle = None if is_local(fs) else source
            if ext == ".npz":
                self._npz = np.load(source, allow_pickle=False)
                if not isinstance(self._npz, np.lib.npyio.NpzFile):
                    self._npz = None
                    raise ValueError("not an .npz archive: a single array (.npy) named .npz; save the arrays "
                                     "with np.savez(path, features=..., labels=...)")
                found = list(self._npz.files)
            else:
                import h5py

                self._h5 = h5py.File(source, "r")
                found = list(self._h5.keys())
        except LongtailError:
            raise
        except Exception as e:  # zipfile.BadZipFile, OSError, ValueError ... (corrupt file)
            self.close()
            raise LongtailError(f"{self.path}: cannot read feature file ({_one_line(e)})") from e
        try:
            self._validate(found)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ raw access
    def _raw(self, key: str) -> np.ndarray:
        try:
            if self._npz is not None:
                return np.asarray(self._npz[key])
            return np.asarray(self._h5[key][()])
        except Exception as e:  # truncated member, object array (pickle refused), bad dataset
            raise LongtailError(f"{self.path}: cannot read {key!r} ({_one_line(e)})") from e

    def _validate(self, found: list[str]) -> None:
        listed = ", ".join(sorted(found)) or "nothing"
        if "features" not in found:
            raise LongtailError(f"{self.path}: missing key 'features' (found: {listed})")
        if "labels" not in found:
            if self.require_labels:
                raise LongtailError(f"{self.path}: missing key 'labels' (found: {listed})")
            other = sorted(set(found) - {"features", "attributes"})
            if other:
                raise LongtailError(
                    f"{self.path}: missing key 'labels' (found: {listed}); a file without labels (an "
                    f"unlabelled split) may hold only 'features' and 'attributes', not {other[0]!r}"
                )
        if self._h5 is not None:
            import h5py

            for key in KEYS:
                if key in found and not isinstance(self._h5[key], h5py.Dataset):
                    raise LongtailError(f"{self.path}: {key!r} is an HDF5 group, not a dataset")
            feats = self._h5["features"]
            shape, dtype = tuple(feats.shape), feats.dtype
            self._features = None
        else:
            self._features = self._raw("features")
            shape, dtype = self._features.shape, self._features.dtype
        if len(shape) != 2:
            raise LongtailError(f"{self.path}: 'features' must be 2-D (N x D), got shape {shape}")
        if dtype.kind not in "fiu":
            raise LongtailError(f"{self.path}: 'features' must be numbers, got dtype {dtype}")
        self.n, self.dim = int(shape[0]), int(shape[1])
        if self.n == 0 or self.dim == 0:
            raise LongtailError(f"{self.path}: 'features' is empty, shape {shape}")
        self.labels = self._int_vector("labels") if "labels" in found else None
        self.attributes = self._int_vector("attributes") if "attributes" in found else None
        if self.attributes is not None and self.attributes.min() < 0:
            raise LongtailError(f"{self.path}: 'attributes' must be >= 0 (found {int(self.attributes.min())})")

    def _int_vector(self, key: str) -> np.ndarray:
        arr = self._raw(key)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise LongtailError(f"{self.path}: {key!r} must be 1-D, got shape {arr.shape}")
        if arr.shape[0] != self.n:
            raise LongtailError(
                f"{self.path}: {self.n} feature rows but {arr.shape[0]} {key} (they must have the same length)"
            )
        if arr.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))
            if bad.size:
                raise LongtailError(f"{self.path}: {key!r} must be integers (found {arr[bad[0]]!r} at row {int(bad[0])})")
        elif arr.dtype.kind not in "iu":
            raise LongtailError(f"{self.path}: {key!r} must be integers, got dtype {arr.dtype}")
        return arr.astype(np.int64)

    # ------------------------------------------------------------------ features
    def block_rows(self) -> int:
        return max(1, _BLOCK_BYTES // (4 * self.dim))

    def iter_features(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(start, (n, D) float32)`` blocks, each checked for NaN/inf."""
        rows = rows or self.block_rows()
        for start in range(0, self.n, rows):
            stop = min(self.n, start + rows)
            if self._features is not None:
                block = self._features[start:stop]
            else:
                try:
                    block = self._h5["features"][start:stop]
                except Exception as e:
                    raise LongtailError(f"{self.path}: cannot read 'features' rows {start}..{stop - 1} ({_one_line(e)})") from e
            block = np.ascontiguousarray(block, dtype=np.float32)
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                bad = np.flatnonzero(~finite)
                raise LongtailError(
                    f"{self.path}: NaN or infinite features in {bad.size} row(s) of rows {start}..{stop - 1} "
                    f"(first at row {start + int(bad[0])})"
                )
            yield start, block

    def close(self) -> None:
        for handle in (self._h5, self._npz, self._handle):
            if handle is not None and hasattr(handle, "close"):  # np.load of an .npy gives an array
                handle.close()
        self._h5 = self._npz = self._handle = None

    def __enter__(self) -> "_FeatureFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_feature_file(path: str, require_labels: bool = True) -> dict[str, np.ndarray]:
    """Reads one feature file whole: ``{"features": (N, D) float32, "labels": (N,) int64}``
    plus ``"attributes": (N,) int64`` when the file has them.

    With ``require_labels=False`` a file without ``labels`` is an unlabelled split: the result
    then has no ``"labels"`` key (like ``"attributes"`` when absent), and the file may hold no
    key besides ``features`` and ``attributes`` (see the module docstring).

    LongtailError (naming the file) for a missing, unreadable or corrupt file, an unsupported
    extension, a missing key, features that are not 2-D or not finite, lengths that differ, or
    non-integer labels."""
    with _FeatureFile(path, require_labels=require_labels) as f:
        feats = np.empty((f.n, f.dim), dtype=np.float32)
        for start, block in f.iter_features():
            feats[start : start + block.shape[0]] = block
        out = {"features": feats}
        if f.labels is not None:
            out["labels"] = f.labels
        if f.attributes is not None:
            out["attributes"] = f.attributes
        return out


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_features` did: ``store`` is the complete store at ``url``;
    ``reused`` is True when it was already there, built from the very same files."""

    store: FeatureStore
    url: str
    reused: bool


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, desc=desc, unit="row", disable=not show, leave=False)


def import_features(
    train: str,
    test: str,
    out: str,
    val: str | None = None,
    class_names: Sequence[str] | None = None,
    *,
    extra: Mapping[str, str] | None = None,
    storage_options: dict | None = None,
    chunk_rows: int | None = None,
    progress: bool | None = None,
    lock_timeout: float = DEFAULT_TIMEOUT,
) -> ImportResult:
    """Builds a complete feature store at ``out`` from user feature files (one per split).

    Splits are ``train``, ``val`` (when given), ``test``, then the ``extra`` ones in their order:
    ``extra`` maps additional split names (lower-case letters, digits and ``_``, starting with a
    letter; not ``train``/``val``/``test``), for example ``{"deploy": "target.npz"}``, to files.
    ``train`` must have labels; a ``val``, ``test`` or extra file without ``labels`` becomes an
    unlabelled split (:meth:`~storage.featurestore.FeatureStore.has_labels` false, read back
    with ``labels=None``; see :func:`load_feature_file` for what such a file may hold). An
    unlabelled split is for deployment-prior estimation: evaluating methods on ``test`` (and
    fitting on ``val``) still needs their labels.

    The number of classes ``C`` is ``len(class_names)`` when given, else the largest label over
    all labelled files + 1 (class names are then ``"0"``, ``"1"``, ...). ``class_counts`` are
    the train label counts. The backbone identity is ``{"kind": "imported", "files":
    [basenames]}``; the backbone hash is the blake2b of the files' bytes (keyed by split, extra
    splits included) and the dataset fingerprint hashes those and the class names.

    If ``out`` holds a complete store built from the very same files and class names (same
    dataset fingerprint), it is returned as is (``reused=True``); any other complete store at
    ``out`` raises LongtailError and is not touched. An incomplete store from an interrupted
    import of the same files is resumed. Errors: any bad file (see :func:`load_feature_file`),
    feature dimensions that differ between files, labels outside ``[0, C)``, a class without a
    train sample; on such an error the partial store is deleted.

    ``out`` may be any fsspec URL (``storage_options`` are its options); the input files may be
    local paths or URLs too (opened with the backend's default options: environment variables or
    fsspec configuration). Two imports into the same ``out`` at once: the second waits up to
    ``lock_timeout`` seconds for the first and reuses its store when it was built from the same
    files (see :class:`~storage.featurestore.FeatureStoreWriter`).
    """
    paths = {"train": str(train)}
    if val is not None:
        paths["val"] = str(val)
    paths["test"] = str(test)
    for name, p in (extra or {}).items():
        if not isinstance(name, str) or not SPLIT_NAME.match(name):
            raise LongtailError(
                f"import-features: bad extra split name {name!r} (lower-case letters, digits and _, "
                "starting with a letter)"
            )
        if name in _FIXED_SPLITS:  # extra's keys are unique: only these can clash
            raise LongtailError(f"import-features: extra split name {name!r} clashes with the train/val/test splits")
        if not isinstance(p, (str, os.PathLike)) or not str(p):
            raise LongtailError(f"import-features: extra split {name!r} needs a feature file, got {p!r}")
        paths[name] = str(p)
    names_given = None if class_names is None else [str(n) for n in class_names]
    if names_given is not None and not names_given:
        raise LongtailError("import-features: class_names is empty")

    def identity() -> tuple[dict, str, str]:
        hashes = {}
        for split, p in paths.items():
            try:
                hashes[split] = file_hash(p)
            except OSError as e:
                raise LongtailError(f"{p}: cannot read feature file ({_one_line(e)})") from e
        # a file name that is not UTF-8 (bytes kept as surrogates) is recorded with escapes: the
        # store's metadata and every report built on it are UTF-8
        backbone = {"kind": "imported", "files": [os.fsencode(os.path.basename(p)).decode("utf-8", "backslashreplace")
                                                  for p in paths.values()]}
        backbone_hash = json_hash({"imported": hashes})
        dataset_fp = json_hash({"imported": hashes, "class_names": names_given})
        return backbone, backbone_hash, dataset_fp

    status = store_status(out, storage_options=storage_options)
    if status == "complete":
        existing = open_store(out, storage_options=storage_options)
        for p in paths.values():  # a clean "not found" before hashing
            fs, fpath = check_access(p)
            if not fs.isfile(fpath):
                raise LongtailError(f"{p}: feature file not found")
        backbone, backbone_hash, dataset_fp = identity()
        if existing.dataset_fingerprint == dataset_fp and existing.backbone_hash == backbone_hash:
            return ImportResult(existing, str(out), reused=True)
        raise LongtailError(
            f"{out}: already holds a complete feature store (from other inputs); it is never "
            "overwritten: choose another output or delete it first"
        )

    files: dict[str, _FeatureFile] = {}
    try:
        for split, p in paths.items():
            files[split] = _FeatureFile(p, require_labels=split == "train")
        dim = files["train"].dim
        for split, f in files.items():
            if f.dim != dim:
                raise LongtailError(f"{f.path}: features have dimension {f.dim}, but {files['train'].path} has {dim}")
        labelled = [f for f in files.values() if f.labels is not None]  # train at least
        if names_given is not None:
            num_classes = len(names_given)
        else:
            num_classes = max(int(f.labels.max()) for f in labelled) + 1
            train_labels = files["train"].labels
            if num_classes > train_labels.size:  # some class is surely empty: refuse before C counters are allocated
                worst = max(labelled, key=lambda f: int(f.labels.max()))
                distinct = np.unique(train_labels).size
                raise LongtailError(
                    f"{worst.path}: label {int(worst.labels.max())} implies {num_classes} classes, but the train split "
                    f"has {distinct} distinct labels in {train_labels.size} rows: labels must be class indices "
                    "0..C-1 (is this an id column?)")
        for f in labelled:
            lo, hi = int(f.labels.min()), int(f.labels.max())
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                raise LongtailError(f"{f.path}: label {bad} outside [0, {num_classes}) ({num_classes} classes)")
        names = names_given or [str(c) for c in range(num_classes)]
        counts = np.bincount(files["train"].labels, minlength=num_classes)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            listed = ", ".join(repr(names[c]) for c in empty[:5]) + (" ..." if empty.size > 5 else "")
            raise LongtailError(f"{files['train'].path}: {empty.size} class(es) with no train sample: {listed}")

        backbone, backbone_hash, dataset_fp = identity()
        writer = FeatureStoreWriter(
            out,
            class_names=names,
            class_counts=counts,
            backbone=backbone,
            backbone_hash=backbone_hash,
            dataset_fingerprint=dataset_fp,
            feature_dim=dim,
            splits={s: f.n for s, f in files.items()},
            has_attributes={s: f.attributes is not None for s, f in files.items()},
            has_labels={s: f.labels is not None for s, f in files.items()},
            chunk_rows=chunk_rows,
            storage_options=storage_options,
            lock_timeout=lock_timeout,
            reuse_complete=True,  # another import of these very files may have finished meanwhile
        )
        try:
            for split, f in files.items():
                if writer.split_done(split):
                    continue
                writer.begin_split(split)
                with _progress(f.n, f"import {split}", progress) as bar:
                    for start, block in f.iter_features():
                        stop = start + block.shape[0]
                        writer.write_chunk(
                            split,
                            block,
                            None if f.labels is None else f.labels[start:stop],
                            attributes=None if f.attributes is None else f.attributes[start:stop],
                        )
                        bar.update(block.shape[0])
                writer.end_split(split)
            writer.finish()
        except LongtailError:
            writer.abort()  # bad data: a partial store from these files is worth nothing
            raise
        finally:
            writer.close()  # releases the store's lock whatever happened (idempotent)
    finally:
        for f in files.values():
            f.close()
    return ImportResult(open_store(out, storage_options=storage_options), str(out), reused=writer.reused)


__all__ = ["EXTENSIONS", "ImportResult", "import_features", "load_feature_file"]
