"""Shared fixtures. Keep this file small: helpers for one test file live in that file.

The operator references (readable loops over bins) are in ``ops_reference.py``; the tiny
detection set and detector the CLI tests share are made by ``tiny_detect.py``.
"""

from __future__ import annotations

import pytest
import torch

from sppnet.ops import _kernels


@pytest.fixture(params=["kernel", "torch"])
def op_path(request, monkeypatch):
    """Runs a test once with the numba kernels (where they apply) and once without."""
    if request.param == "torch":
        monkeypatch.setattr(_kernels, "HAVE_NUMBA", False)
    elif not _kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module: on a shared 2-core machine OpenMP's spin-waiting makes two far slower.

    Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
