"""Reading a complete feature store: :func:`open_store` and :class:`FeatureStore`."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.storage.featurestore.hashing import SplitHash
from longtail.storage.featurestore.schema import FINITE_ATTR, SCHEMA_VERSION, CorruptStoreError, StorePlan
from longtail.storage.featurestore.status import root_attrs
from longtail.storage.fs import is_local, join, resolve, zarr_store

#: bytes of a Blosc (v1) chunk header: version, versionlz, flags, typesize, nbytes, blocksize, cbytes
_BLOSC_HEADER = 16
REBUILD = "rebuild the store (or import it again)"
#: bytes read (and checksummed) at a time by the direct chunk reader: small enough that the checksum
#: reads them back from the CPU cache, not from memory (256 KiB measured fastest on 2 cores)
_PIECE = 256 << 10


def _file_state(path: str) -> tuple[int, int, int] | None:
    """``(inode, size, mtime_ns)`` of a local file, None when it cannot be stat-ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def open_store(url: str, *, storage_options: dict | None = None) -> "FeatureStore":
    """Opens a complete feature store for reading.

    Raises LongtailError when nothing is there, when the store is incomplete (interrupted), when
    its schema version is unknown, or when its metadata is corrupt.
    """
    url = str(url)
    attrs = root_attrs(url, storage_options)
    if attrs is None:
        raise LongtailError(f"{url}: no feature store there")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise LongtailError(
            f"{url}: feature store schema_version {attrs.get('schema_version')!r} is not supported "
            f"(this longtail reads version {SCHEMA_VERSION})"
        )
    if attrs.get("complete") is not True:
        raise LongtailError(f"{url}: the feature store was interrupted while being written; rerun to resume or rebuild it")
    return FeatureStore(url, attrs, storage_options)


class FeatureStore:
    """A complete feature store, read-only. Build it with :func:`open_store`.

    Properties give the root attributes (``plan`` the validated :class:`StorePlan`);
    :meth:`read` returns one split as a validated :class:`~stages.data.FeatureSet`;
    :meth:`iter_chunks` streams a split in row blocks. A damaged store raises
    :class:`CorruptStoreError` (a LongtailError) naming the URL and split.
    """

    def __init__(self, url: str, attrs: dict, storage_options: dict | None = None, *,
                 plan: StorePlan | None = None) -> None:
        """``attrs``: the root attributes as read (:func:`open_store` checked the store is
        complete and of this schema version). ``plan``: the plan of ``attrs`` when the caller
        has already validated it (a writer that found its own plan there), else it is validated
        here; a corrupt plan raises :class:`CorruptStoreError`."""
        import zarr

        self.url = url
        self._attrs = attrs
        self._storage_options = storage_options
        if plan is None:
            plan = StorePlan.from_attrs(url, attrs, required=("fingerprint",))
        elif "fingerprint" not in attrs:
            raise self._corrupt("root attribute 'fingerprint' is missing")
        self.plan = plan
        if "has_labels" not in attrs:  # a store written before unlabelled splits existed
            attrs["has_labels"] = dict(plan.has_labels)
        try:
            self._root = zarr.open_group(zarr_store(url, read_only=True, storage_options=storage_options), mode="r")
        except Exception as e:  # a corrupt store: zarr raises many types
            raise CorruptStoreError(f"{url}: corrupt feature store ({type(e).__name__}: {e})") from e
        self._groups: dict[str, Any] = {}
        self._arrays: dict[str, dict[str, Any]] = {}  # split -> its arrays, opened once
        self._fs_path: tuple[Any, str] | None = None  # (fsspec filesystem, path) for raw chunk checks
        #: (split, key, chunk number) -> (path, (inode, size, mtime_ns), read-only memory map of its
        #: rows) of a local raw chunk file whose CRC-32C :meth:`read_rows` checked: its rows are
        #: then read from the map while the file keeps that state
        self._verified: dict[tuple[str, str, int], tuple[str, tuple[int, int, int], np.ndarray]] = {}

    def _corrupt(self, what: str) -> CorruptStoreError:
        return CorruptStoreError(f"{self.url}: corrupt feature store: {what}")

    # ------------------------------------------------------------------ metadata
    @property
    def attrs(self) -> dict:
        """A copy of the root attributes."""
        return copy.deepcopy(self._attrs)

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names, in the order they were planned (``train``, ``val``, ``test``)."""
        return tuple(self._attrs["splits"])

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(str(n) for n in self._attrs["class_names"])

    @property
    def class_counts(self) -> np.ndarray:
        """``(C,)`` int64 per-class train counts."""
        return np.asarray(self._attrs["class_counts"], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self._attrs["class_names"])

    @property
    def feature_dim(self) -> int:
        return int(self._attrs["feature_dim"])

    @property
    def fingerprint(self) -> str:
        """Content hash of the whole store (see the module docstring)."""
        return str(self._attrs["fingerprint"])

    @property
    def backbone(self) -> dict:
        return copy.deepcopy(self._attrs["backbone"])

    @property
    def backbone_hash(self) -> str:
        return str(self._attrs["backbone_hash"])

    @property
    def dataset_fingerprint(self) -> str:
        return str(self._attrs["dataset_fingerprint"])

    def num_rows(self, split: str) -> int:
        self._group(split)
        return int(self._attrs["splits"][split])

    def has_attributes(self, split: str) -> bool:
        self._group(split)
        return "attributes" in self._arrays[split]

    def has_labels(self, split: str) -> bool:
        """False for an unlabelled split (:meth:`read` gives ``labels=None``); stores written
        before unlabelled splits existed have every split labelled."""
        self._group(split)
        return self._attrs["has_labels"].get(split, True) is True

    def split_fingerprint(self, split: str) -> str:
        """Content hash of one split (features, labels, attributes as written)."""
        return str(self._group(split).attrs["fingerprint"])

    def __repr__(self) -> str:
        rows = ", ".join(f"{s}={n}" for s, n in self._attrs["splits"].items())
        return f"FeatureStore({self.url!r}, C={self.num_classes}, D={self.feature_dim}, {rows})"

    # ------------------------------------------------------------------ splits
    def _group(self, split: str):
        if split in self._groups:
            return self._groups[split]
        if split not in self._attrs["splits"]:
            raise LongtailError(f"{self.url}: no split {split!r} in the feature store (splits: {', '.join(self.splits)})")
        rows = self._attrs["splits"][split]
        where = f"split {split!r}"
        try:
            g = self._root[split]
            sattrs = g.attrs.asdict()
            arrays = {k: g[k] for k in ("features", "labels", "index", "attributes") if k in g}
        except LongtailError:
            raise
        except Exception as e:
            raise self._corrupt(f"{where} is unreadable ({type(e).__name__}: {e})") from e
        if sattrs.get("complete") is not True or sattrs.get("rows") != rows or not sattrs.get("fingerprint"):
            raise self._corrupt(f"{where} is not marked complete with {rows} rows")
        expected = {"features": ((rows, self.feature_dim), "float32"), "index": ((rows,), "int64")}
        if self._attrs["has_labels"].get(split, True) is True:
            expected["labels"] = ((rows,), "int64")
        elif "labels" in arrays:
            raise self._corrupt(f"{where} is planned unlabelled but has a 'labels' array")
        if self._attrs["has_attributes"].get(split):
            expected["attributes"] = ((rows,), "int64")
        for key, (shape, dtype) in expected.items():
            if key not in arrays:
                raise self._corrupt(f"{where} has no {key!r} array")
            arr = arrays[key]
            if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
                raise self._corrupt(f"{where}: {key!r} is {arr.dtype} {tuple(arr.shape)}, expected {dtype} {shape}")
        self._groups[split] = g
        self._arrays[split] = arrays  # opening an array reads its metadata: once, not per chunk
        return g

    # ------------------------------------------------------------------ chunks
    def _chunk_keys(self, split: str, key: str, start: int | None, stop: int | None) -> list[tuple[str, int]]:
        """``(chunk key, rows in it)`` of the stored chunks of ``key`` that rows ``start:stop`` touch."""
        arr = self._arrays[split][key]
        n, rows = int(arr.shape[0]), int(arr.chunks[0])
        lo, hi = (start or 0), (n if stop is None else min(stop, n))
        if hi <= lo:
            return []
        return [(self._chunk_key(split, key, i), rows) for i in range(lo // rows, (hi - 1) // rows + 1)]

    def _chunk_key(self, split: str, key: str, i: int) -> str:
        """The store key of chunk ``i`` (along the rows) of ``key``."""
        arr = self._arrays[split][key]
        return arr.metadata.encode_chunk_key((i,) + (0,) * (len(arr.shape) - 1))

    def _chunk_path(self, split: str, key: str, chunk: str) -> str:
        if self._fs_path is None:
            self._fs_path = resolve(self.url, self._storage_options)
        return join(self._fs_path[1], split, key, chunk)

    def _checksummed(self, split: str, key: str) -> bool:
        codecs = self._arrays[split][key].compressors
        return bool(codecs) and type(codecs[-1]).__name__ == "Crc32cCodec"

    def _check_blosc_headers(self, split: str, key: str, start: int | None, stop: int | None) -> None:
        """For an array without per-chunk checksums (a store written before they existed) whose
        chunks are Blosc-compressed: each chunk's size must be the compressed size its header
        states, and its uncompressed size that of a chunk, before the decompressor sees it (a
        truncated chunk would make it read past the end of its buffer)."""
        arr = self._arrays[split][key]
        if not any(type(c).__name__ == "BloscCodec" for c in arr.compressors):
            return
        expected = int(np.prod(arr.chunks)) * arr.dtype.itemsize
        for chunk, _ in self._chunk_keys(split, key, start, stop):
            path = self._chunk_path(split, key, chunk)
            fs = self._fs_path[0]
            try:
                size = int(fs.size(path))
            except FileNotFoundError:
                continue  # a lost chunk reads as the fill value, which the checks below refuse
            head = fs.cat_file(path, start=0, end=_BLOSC_HEADER) if size >= _BLOSC_HEADER else b""
            where = f"{split}/{key}/{chunk}"
            if len(head) < _BLOSC_HEADER:
                raise self._corrupt(f"chunk {where} is truncated ({size} bytes, no Blosc header); {REBUILD}")
            nbytes, cbytes = (int.from_bytes(head[o:o + 4], "little") for o in (4, 12))
            if cbytes != size:
                raise self._corrupt(f"chunk {where} is truncated or padded ({size} bytes, its header says "
                                    f"{cbytes}); {REBUILD}")
            if nbytes != expected:
                raise self._corrupt(f"chunk {where} decompresses to {nbytes} bytes, a chunk holds {expected}; {REBUILD}")

    def _bad_chunk(self, split: str, key: str, start: int | None, stop: int | None) -> str | None:
        """The first chunk of rows ``start:stop`` that does not decode, as ``split/key/chunk: why``."""
        arr = self._arrays[split][key]
        first = (start or 0) // int(arr.chunks[0])
        for i, (chunk, rows) in enumerate(self._chunk_keys(split, key, start, stop)):
            lo = (first + i) * rows
            try:
                np.asarray(arr[lo:lo + rows])
            except Exception as e:
                why = "fails its checksum" if "checksum" in str(e).lower() else f"does not decode ({type(e).__name__})"
                return f"{split}/{key}/{chunk} {why}"
        return None

    def _raw(self, split: str, key: str) -> bool:
        """Whether ``key`` has the layout of :data:`~storage.featurestore.schema.RAW_CHUNKS`
        (codecs exactly ``bytes`` little-endian then ``crc32c``, a regular chunk grid), which
        :meth:`_read_raw` reads without zarr, on a little-endian machine."""
        arr = self._arrays[split][key]
        codecs = getattr(arr.metadata, "codecs", ())
        if sys.byteorder != "little" or len(codecs) != 2 or arr.dtype.byteorder == ">":
            return False
        first, last = codecs
        endian = getattr(getattr(first, "endian", None), "value", None)
        return (type(first).__name__ == "BytesCodec" and (endian == "little" or arr.dtype.itemsize == 1)
                and type(last).__name__ == "Crc32cCodec"
                and type(arr.metadata.chunk_grid).__name__ == "RegularChunkGrid")

    def _read_raw(self, split: str, key: str, start: int | None, stop: int | None) -> np.ndarray:
        """Rows ``start:stop`` of a :meth:`_raw` array, read chunk file by chunk file straight into
        one preallocated array (a chunk wholly inside the range is read in place; the part-used
        first or last chunk goes through a scratch buffer), each checked as it is read: its size,
        and its CRC-32C, computed over pieces of :data:`_PIECE` bytes while they are in the CPU
        cache. A missing, truncated, padded or corrupt chunk raises CorruptStoreError naming it
        (zarr would read a missing chunk as its fill value)."""
        import google_crc32c

        arr = self._arrays[split][key]
        n, rows = int(arr.shape[0]), int(arr.chunks[0])
        lo, hi = (start or 0), (n if stop is None else min(stop, n))
        out = np.empty((max(hi - lo, 0),) + tuple(arr.shape[1:]), dtype=arr.dtype.newbyteorder("<"))
        if hi <= lo:
            return out
        flat = out.reshape(-1).view(np.uint8)
        row_bytes = flat.size // (hi - lo)
        nbytes = rows * row_bytes
        if self._fs_path is None:
            self._fs_path = resolve(self.url, self._storage_options)
        fs = self._fs_path[0]
        local = is_local(fs)
        scratch = None
        for i, (chunk, _) in enumerate(self._chunk_keys(split, key, lo, hi), start=lo // rows):
            c0 = i * rows
            a, b = max(lo, c0), min(hi, c0 + rows)
            if a == c0 and b == c0 + rows:
                buf = flat[(a - lo) * row_bytes:(b - lo) * row_bytes]
            else:
                scratch = np.empty(nbytes, np.uint8) if scratch is None else scratch
                buf = scratch
            path = self._chunk_path(split, key, chunk)
            where = f"{split}/{key}/{chunk}"
            try:
                if local:
                    with open(path, "rb", buffering=0) as f:
                        crc = 0
                        for o in range(0, nbytes, _PIECE):
                            piece = buf[o:o + _PIECE]
                            got = f.readinto(piece) or 0
                            while 0 < got < piece.size:  # a short read before the end: rare
                                more = f.readinto(piece[got:])
                                if not more:
                                    break
                                got += more
                            if got != piece.size:
                                raise self._corrupt(f"chunk {where} is truncated (under {nbytes + 4} bytes); {REBUILD}")
                            crc = google_crc32c.extend(crc, piece)
                        tail = f.read(5)
                else:
                    data = fs.cat_file(path)
                    if len(data) >= nbytes:
                        buf[:] = np.frombuffer(data, np.uint8, nbytes)
                    crc = google_crc32c.value(buf) if len(data) >= nbytes else 0
                    tail = bytes(data[nbytes:nbytes + 5]) if len(data) >= nbytes else b""
            except FileNotFoundError:
                raise self._corrupt(f"chunk {where} is missing; {REBUILD}") from None
            except OSError as e:
                raise self._corrupt(f"chunk {where} cannot be read ({type(e).__name__}: {e}); {REBUILD}") from e
            if len(tail) != 4:
                raise self._corrupt(f"chunk {where} is truncated or padded (a chunk is {nbytes + 4} bytes); {REBUILD}")
            if crc != int.from_bytes(tail, "little"):
                raise self._corrupt(f"chunk {where} fails its checksum; {REBUILD}")
            if buf is scratch:
                flat[(a - lo) * row_bytes:(b - lo) * row_bytes] = scratch[(a - c0) * row_bytes:(b - c0) * row_bytes]
        return out

    def _read(self, split: str, key: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        self._group(split)
        if self._raw(split, key):
            out = self._read_raw(split, key, start, stop)
            if key in ("attributes", "index") and out.size and out.min() < 0:
                raise self._corrupt(f"split {split!r}: {key!r} has negative entries")
            return out
        if not self._checksummed(split, key):
            self._check_blosc_headers(split, key, start, stop)
        try:
            out = np.asarray(self._arrays[split][key][start:stop])
        except Exception as e:  # lost/garbled chunk bytes: codecs raise many types
            bad = self._bad_chunk(split, key, start, stop)
            if bad is not None:
                raise self._corrupt(f"chunk {bad}; {REBUILD}") from e
            raise self._corrupt(f"split {split!r}: cannot read {key!r} ({type(e).__name__}: {e})") from e
        if key in ("attributes", "index") and out.size and out.min() < 0:
            raise self._corrupt(f"split {split!r}: {key!r} has negative entries (a lost chunk reads -1)")
        return out

    def _feature_set(self, split: str, name: str, start: int | None, stop: int | None) -> FeatureSet:
        return self._assemble(split, name, lambda key: self._read(split, key, start, stop))

    def _assemble(self, split: str, name: str, read) -> FeatureSet:
        """The FeatureSet of the rows ``read(key)`` returns for each of the split's arrays."""
        attrs = read("attributes") if self.has_attributes(split) else None
        feats = read("features")
        # read chunk by chunk with every chunk present and its checksum verified, from a split whose
        # writer checked every value finite: the FeatureSet need not scan them all again
        checked = self._raw(split, "features") and self._groups[split].attrs.get(FINITE_ATTR) is True
        try:
            return FeatureSet(
                features=feats,
                features_checked=checked,
                labels=read("labels") if self.has_labels(split) else None,
                class_counts=self.class_counts,
                class_names=self.class_names,
                attributes=attrs,
                index=read("index"),
                name=name,
                source=self.url,
                meta={
                    "split_fingerprint": self.split_fingerprint(split),
                    "store_fingerprint": self.fingerprint,
                    "backbone": self.backbone,
                    "backbone_hash": self.backbone_hash,
                    "dataset_fingerprint": self.dataset_fingerprint,
                },
            )
        except CorruptStoreError:
            raise
        except LongtailError as e:  # the FeatureSet's own checks: stored data that cannot be right
            raise CorruptStoreError(f"{e} (the feature store is corrupt or was edited by hand; rebuild it)") from e

    def read(self, split: str) -> FeatureSet:
        """Split ``split`` in full as a validated FeatureSet (``name=split``, ``source=url``).

        Shapes: features ``(N, D)`` float32, labels ``(N,)`` int64 (``None`` for an unlabelled
        split, see :meth:`has_labels`), attributes ``(N,)`` int64 or None, index ``(N,)`` int64;
        class_counts ``(C,)`` are the train counts.
        """
        return self._feature_set(split, split, None, None)

    def read_rows(self, split: str, rows) -> FeatureSet:
        """Rows ``rows`` of ``split`` (at least one; integers in ``[0, num_rows)``, any order, repeats allowed),
        as a validated FeatureSet in that order: the minibatch of an out-of-core training loop.

        Every stored chunk the rows touch is read once per call, not once per row. In a local
        store of the checksummed raw layout, a chunk's first read reads it whole and checks its
        CRC-32C, then maps its file; while the file keeps the inode, size and modification time it
        had then (checked at every call), later calls gather their rows from that map, reading
        only the pages they touch. Object stores and older layouts read each touched chunk whole,
        checked as :meth:`read` checks it.
        Raises LongtailError for indices that are not integers or are out of range.
        """
        n = self.num_rows(split)
        idx = np.asarray(rows)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise LongtailError(f"{self.url}: read_rows takes a 1-D array of integer row numbers, got "
                                f"{idx.dtype} of shape {idx.shape}")
        if not idx.size:
            raise LongtailError(f"{self.url}: read_rows needs at least one row number")
        idx = idx.astype(np.int64, copy=False)
        if idx.min() < 0 or idx.max() >= n:
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise LongtailError(f"{self.url}: row {bad} is out of range for split {split!r} ({n} rows)")
        self._group(split)
        name = f"{split}[{idx.size} rows]"
        return self._assemble(split, name, lambda key: self._gather(split, key, idx))

    def _gather(self, split: str, key: str, idx: np.ndarray) -> np.ndarray:
        """``key``'s rows ``idx`` (checked in range), each touched chunk read once (:meth:`read_rows`)."""
        arr = self._arrays[split][key]
        chunk_rows = int(arr.chunks[0])
        order = np.argsort(idx, kind="stable")
        srt = idx[order]
        of = srt // chunk_rows  # the chunk of each row, in row order
        starts = np.flatnonzero(np.diff(of, prepend=-1))
        local = srt - of * chunk_rows
        buf = np.empty((idx.size,) + tuple(arr.shape[1:]), dtype=arr.dtype.newbyteorder("="))
        if self._fs_path is None:
            self._fs_path = resolve(self.url, self._storage_options)
        direct = self._raw(split, key) and is_local(self._fs_path[0])
        for a, b, c in zip(starts.tolist(), starts[1:].tolist() + [idx.size], of[starts].tolist()):
            if not direct:
                c0 = c * chunk_rows
                buf[a:b] = self._read(split, key, c0, min(c0 + chunk_rows, int(arr.shape[0])))[local[a:b]]
                continue
            seen = self._verified.get((split, key, c))
            path = self._chunk_path(split, key, self._chunk_key(split, key, c)) if seen is None else seen[0]
            state = _file_state(path)
            if seen is None or seen[1] != state:
                seen = self._verify_chunk(split, key, c, path, state)
            np.take(seen[2], local[a:b], axis=0, out=buf[a:b])
        out = np.empty_like(buf)
        out[order] = buf
        if direct and key in ("attributes", "index") and out.min() < 0:  # else _read checked them
            raise self._corrupt(f"split {split!r}: {key!r} has negative entries")
        return out

    def _verify_chunk(self, split: str, key: str, c: int, path: str, state: tuple | None) -> tuple:
        """Reads chunk ``c`` of a local raw array whole, checking its size and CRC-32C
        (:meth:`_read_raw`), then maps its file read-only; remembered with the file's
        ``(inode, size, mtime)`` from before the read when the file kept them meanwhile (a chunk
        rewritten while it was read is read whole again next time). Returns ``(path, state, rows)``."""
        arr = self._arrays[split][key]
        chunk_rows = int(arr.chunks[0])
        checked = self._read_raw(split, key, c * chunk_rows, (c + 1) * chunk_rows)  # raises naming the chunk
        shape = (chunk_rows,) + tuple(arr.shape[1:])
        rows = np.memmap(path, dtype=arr.dtype.newbyteorder("<"), mode="r", shape=shape).view(np.ndarray)
        if state is None or _file_state(path) != state:
            return path, None, checked  # changed meanwhile: this call uses the bytes it checked
        self._verified[(split, key, c)] = entry = (path, state, rows)
        return entry

    def iter_chunks(
        self, split: str, rows: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """Yields ``(features (n, D) float32, labels (n,) int64 | None, attributes (n,) int64 | None)``
        blocks of at most ``rows`` rows (default: the stored chunk size), in order, each
        validated like :meth:`read`; labels are None throughout for an unlabelled split."""
        n = self.num_rows(split)
        if rows is None:
            self._group(split)
            rows = int(self._arrays[split]["features"].chunks[0])
        if rows < 1:
            raise LongtailError(f"{self.url}: iter_chunks rows must be >= 1, got {rows}")
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            fs = self._feature_set(split, f"{split}[{start}:{stop}]", start, stop)
            yield fs.features, fs.labels, fs.attributes

    def verify(self, split: str | None = None) -> None:
        """Recomputes the fingerprint of ``split`` (default: every split, and the store's) from
        the stored bytes, in one streaming pass, chunk by chunk (each chunk's checksum, or for an
        older store its Blosc header, is checked as it is read), and checks the train labels
        against the recorded class counts; raises :class:`CorruptStoreError` naming the split,
        the array or the chunk on a mismatch. Computes nothing else and writes nothing."""
        names = [split] if split is not None else list(self.splits)
        fps = {}
        for name in names:
            h = SplitHash(self.has_attributes(name), self.has_labels(name))
            counts = np.zeros(self.num_classes, dtype=np.int64)
            for feats, labels, attrs in self.iter_chunks(name):
                if labels is not None:
                    counts += np.bincount(labels, minlength=self.num_classes)
                h.update(
                    np.ascontiguousarray(feats, dtype="<f4"),
                    None if labels is None else np.ascontiguousarray(labels, dtype="<i8"),
                    None if attrs is None else np.ascontiguousarray(attrs, dtype="<i8"),
                )
            if name == "train":
                diff = np.flatnonzero(counts != self.class_counts)
                if diff.size:
                    c = int(diff[0])
                    raise self._corrupt(
                        f"{join(self.url, name, 'labels')}: the train labels do not match the recorded class counts "
                        f"(class {self.class_names[c]!r}: {int(self.class_counts[c])} recorded, {int(counts[c])} "
                        f"stored); {REBUILD}")
            fps[name] = h.hexdigest(name, self.num_rows(name), self.feature_dim)
            if fps[name] != self.split_fingerprint(name):
                raise self._corrupt(f"split {name!r}: content does not match its fingerprint (its files under "
                                    f"{join(self.url, name)} were edited or damaged); {REBUILD}")
        if split is None and self.plan.fingerprint(fps) != self.fingerprint:
            raise self._corrupt(f"the store fingerprint does not match its splits; {REBUILD}")


__all__ = ["FeatureStore", "open_store"]
