"""Shared pytest fixtures, and the implementation under test.

``MMSYS_IMPL=PATH`` (set by ``grader.py --impl PATH`` for the shape tests it runs) makes
``import mmsys`` load ``PATH/mmsys`` before any test module imports it; without it the bundled
package is tested. Shape tests reach it only through :mod:`milestones.adapters`.
"""

import os

import pytest
import torch

from milestones.adapters import use_implementation

use_implementation(os.environ.get("MMSYS_IMPL") or None)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: tiny models and small element-wise ops are
    faster that way (10-40x with 2 OpenMP threads on a busy 2-core machine), and tests do not
    fight other processes for the cores. Use with ``pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def repo_env():
    """Environment for a test's child processes: this checkout first on PYTHONPATH, so a child
    (``python -m mmsys...``, torchrun workers) runs this code, not whatever ``pip install -e``
    last pointed at (or nothing, on a checkout that was never installed)."""
    import os
    from pathlib import Path
    repo = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
