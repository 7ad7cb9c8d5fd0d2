"""The domain: config models, the stage graph, cache keys and lineage, the CLI."""
