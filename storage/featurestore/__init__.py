"""The Zarr v3 feature store: backbone features cached once, read by every stage-2 method.

Layout (one Zarr v3 group, opened by URL through fsspec)::

    <url>/                      root group, attributes:
        schema_version          1
        class_names             [C] str
        class_counts            [C] int, per-class counts of the TRAIN split
        backbone                identity dict, e.g. {"kind": "torchvision", "name": "resnet50"}
        backbone_hash           hash of the backbone weights (str)
        dataset_fingerprint     fingerprint of the input dataset (str)
        feature_dim             D
        splits                  {split: planned rows}
        has_attributes          {split: bool}
        has_labels              {split: bool}; ``train`` is always labelled. Stores written
                                before this key existed lack it: read as "every split labelled"
        fingerprint             content hash of all splits      } written LAST, together,
        complete                true                            } after every split is complete
    <url>/<split>/              one group per split (train, val, test; val optional; more named
                                splits such as ``deploy`` allowed), attributes rows_planned, then
                                on completion: complete, rows, fingerprint, features_finite
        features                (N, D) float32, chunked by rows (about 8 MiB a chunk), NaN fill;
                                codecs ``bytes`` (little-endian) then ``crc32c``: every chunk is
                                stored uncompressed, followed by its CRC-32C (every array written
                                by this version; stores written under issue 14 have Blosc LZ4, or
                                Zstandard for the 1-D arrays, before the checksum, and older ones
                                no checksum; both still read)
        labels                  (N,) int64, -1 fill, only where has_labels[split]: an unlabelled
                                split (deployment data for prior estimation) has no labels array
                                at all, rather than one filled with a sentinel that a reader
                                could mistake for data
        attributes              (N,) int64, -1 fill, only where has_attributes[split]
        index                   (N,) int64 sample index into the original dataset, -1 fill

Fingerprints: a split's fingerprint is blake2b over its name, shape and the blake2b of each of
its ``features`` (little-endian float32), ``labels`` and ``attributes`` (little-endian int64)
byte streams, updated chunk by chunk while writing (so it does not depend on how the rows were
chunked, and nothing is re-read). An unlabelled split has no ``labels`` stream and its header
says ``"labels": false``, so it never shares a fingerprint with a labelled split of the same
features; a labelled split's header is unchanged (stores written before unlabelled splits
existed keep their fingerprints). The store's ``fingerprint`` hashes the schema version, class
names, class counts, feature dimension and every split's fingerprint. ``index`` is metadata and
is not part of the fingerprint.

Writing: :class:`FeatureStoreWriter` never overwrites a complete store, resumes an interrupted
one whose plan matches (completed splits are kept), and rebuilds one whose plan differs. One
writer at a time: it holds the lock ``<url>.lock`` next to the store (:mod:`storage.locks`); a
second writer waits, then reuses what the first completed or resumes what it left.
``has_labels`` is part of the plan (:data:`PLAN_KEYS`), compared after reading a missing
``has_labels`` as "every split labelled", so an interrupted store written before the key existed
still resumes under an all-labelled plan.
Reading: :func:`open_store` returns a :class:`FeatureStore`; :meth:`FeatureStore.read` gives a
validated :class:`~stages.data.FeatureSet`. Arrays of the uncompressed layout are read without
zarr, chunk file by chunk file straight into one preallocated array, each chunk checksummed as it
is read (a missing, truncated or padded chunk file, or one whose checksum fails, is refused naming
the chunk); their split records (``features_finite``) that the writer checked every feature
finite, so the read does not scan every value again (an edit made afterwards through another
client is what :meth:`FeatureStore.verify` is for). Older layouts read through zarr and are
scanned. A chunk whose checksum fails (or, in an older store without checksums, whose Blosc header
disagrees with its size: a truncated chunk) is refused before it is decompressed, naming the chunk; :meth:`FeatureStore.verify` re-hashes every split in one
streaming pass against the recorded fingerprints and counts the train labels against the recorded
class counts (the pipeline runs it when a run first opens a store). A missing, interrupted, corrupt or unknown-version
store raises :class:`~stages.errors.LongtailError` naming the URL (and split); a corrupt one
raises its subclass :class:`CorruptStoreError`.

Modules: :mod:`~storage.featurestore.schema` (the schema version, the plan as :class:`StorePlan`,
chunk sizes, :class:`CorruptStoreError`), :mod:`~storage.featurestore.hashing` (split
fingerprints), :mod:`~storage.featurestore.status` (:func:`store_status`),
:mod:`~storage.featurestore.writer` and :mod:`~storage.featurestore.reader`.

Call-order mistakes (``write_chunk`` before ``begin_split``, ``finish`` with a split missing)
are bugs in the caller and raise ``RuntimeError``; bad data raises ``LongtailError``.
"""

from longtail.storage.featurestore.reader import FeatureStore, open_store
from longtail.storage.featurestore.schema import (
    PLAN_KEYS,
    SCHEMA_VERSION,
    SPLIT_NAME,
    CorruptStoreError,
    StorePlan,
)
from longtail.storage.featurestore.status import Status, store_status
from longtail.storage.featurestore.writer import FeatureStoreWriter

__all__ = [
    "PLAN_KEYS",
    "SCHEMA_VERSION",
    "SPLIT_NAME",
    "CorruptStoreError",
    "FeatureStore",
    "FeatureStoreWriter",
    "Status",
    "StorePlan",
    "open_store",
    "store_status",
]
