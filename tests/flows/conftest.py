import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def harness():
    """One temporary Prefect server for every flow test (it takes ~15 s to start)."""
    with prefect_test_harness(server_startup_timeout=120):
        yield
