"""The one training loop of every trained method and its step rules (pure compute)."""
