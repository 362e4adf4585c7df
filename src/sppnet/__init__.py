"""sppnet: SPP-net (He, Zhang, Ren, Sun; ECCV 2014 / TPAMI 2015) for PyTorch.

Layers, one-way: ``ops`` (tensors in, tensors out) <- ``models`` <- ``data`` /
``engine`` (training, evaluation) <- ``cli``.
"""

__version__ = "0.1.0"
