"""sppnet: SPP-net (He, Zhang, Ren, Sun; ECCV 2014 / TPAMI 2015) for PyTorch.

Layers, one-way: ``ops`` (tensors in, tensors out) <- ``models`` <- ``data`` /
``engine`` (training, evaluation) <- ``cli``.
"""

import os

# torch (OpenMP) and the numba kernels each keep a thread pool; with OpenMP's
# default spin-waiting the two pools fight over the cores between calls, which
# made training several times slower on 2 cores. Respect an explicit setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
