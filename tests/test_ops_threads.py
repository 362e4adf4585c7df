"""The numba kernels keep torch's thread count (numba's OpenMP layer shares the runtime with torch)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sppnet.ops import _kernels

# A fresh process: numba starts its thread pool on the first parallel call, once.
_SCRIPT = """
import torch
torch.set_num_threads(1)
from sppnet.ops import roi_spatial_pyramid_pool, spatial_pyramid_pool
x = torch.randn(4, 8, 9, 9, requires_grad=True)
spatial_pyramid_pool(x).sum().backward()
rois = torch.tensor([[0, 0, 0, 5, 5], [1, 2, 1, 8, 7]], dtype=torch.float32)
roi_spatial_pyramid_pool(x.detach(), rois, (3, 1))
print(torch.get_num_threads())
"""


@pytest.mark.skipif(not _kernels.HAVE_NUMBA, reason="numba is not installed")
def test_kernels_keep_torch_thread_count():
    env = dict(os.environ, NUMBA_NUM_THREADS="2", OMP_NUM_THREADS="2")  # a pool wider than torch's count
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "1"
