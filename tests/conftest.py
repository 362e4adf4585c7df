"""Shared fixtures. Keep this file small: helpers for one test file live in it.

The operator references (readable loops over bins) are in ``ops_reference.py``.
"""

from __future__ import annotations

import pytest

from sppnet.ops import _kernels


@pytest.fixture(params=["kernel", "torch"])
def op_path(request, monkeypatch):
    """Runs a test once with the numba kernels (where they apply) and once without."""
    if request.param == "torch":
        monkeypatch.setattr(_kernels, "HAVE_NUMBA", False)
    elif not _kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    return request.param
