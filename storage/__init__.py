"""I/O only: the Zarr feature store and the artifact store, over fsspec URLs."""
