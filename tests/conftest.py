"""Shared pytest fixtures. Add a fixture here only when more than one test file needs it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect server and database for the whole session (started on first use).

    Flows called inside it record their runs, logs and artifacts there, as in production.
    """
    # No internet here: the server's telemetry would only log connection errors.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for in-process training: on a shared, oversubscribed CPU the
    spinning OpenMP threads cost far more than they give (a 5 s test took 76 s at load 12)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
