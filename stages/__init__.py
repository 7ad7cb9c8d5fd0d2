"""The science: pure compute on arrays and tensors. Imports neither storage nor Prefect."""
