"""What every stage after extraction is handed: the feature store it reads (:class:`StoreInfo`)
and the config's artifact cache."""

from __future__ import annotations

from dataclasses import dataclass

from longtail.pipeline.config import RunConfig
from longtail.storage.artifacts import ArtifactStore
from longtail.storage.featurestore import FeatureStore, open_store


@dataclass
class StoreInfo:
    url: str
    fingerprint: str
    cached: bool
    extract_key: str | None = None


def artifact_store(cfg: RunConfig) -> ArtifactStore:
    """The config's artifact cache, with its storage options and lock timeout."""
    return ArtifactStore(cfg.artifacts_url, storage_options=cfg.storage_options, lock_timeout=cfg.lock_timeout)


def open_features(cfg: RunConfig, store: StoreInfo | str) -> FeatureStore:
    """The feature store ``store`` (a :class:`StoreInfo` or a URL), with the config's options."""
    return open_store(store if isinstance(store, str) else store.url, storage_options=cfg.storage_options)
