"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: tiny models and small element-wise ops are
    faster that way (10-40x with 2 OpenMP threads on a busy 2-core machine), and tests do not
    fight other processes for the cores. Use with ``pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
