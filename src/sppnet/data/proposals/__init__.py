"""Region proposals: selective search (SPP-net Sec. 4, step 1), cached on disk.

SPP-net, like R-CNN, scores about 2,000 candidate windows per image produced by
selective search in its "fast" mode (Uijlings et al., IJCV 2013). We use
OpenCV's implementation (``cv2.ximgproc.segmentation``) and add what a training
pipeline needs around it:

* boxes in the project's convention: ``float32 [K, 4]`` rows ``(x1, y1, x2, y2)``
  in 0-based *inclusive* pixel coordinates (``x2 = x + w - 1``), integer-valued;
* R-CNN's post-processing: boxes with a side shorter than ``min_size`` are
  dropped and exact duplicates removed;
* reproducibility: OpenCV ranks its regions with the C library's ``rand()``
  (Uijlings' pseudo-random ranking), so the *order* of the boxes, and hence
  which 2,000 survive the cap, differs between calls. We seed the C ``rand()``
  (``seed`` parameter) right before each run, which makes the output identical
  across calls, processes and worker counts;
* a per-image cache keyed by the SHA-256 of the image file and the parameters
  (:class:`ProposalCache`), and parallel computation (:func:`compute_proposals`).

Images are read with :func:`sppnet.data.images.load_image`, the loader every data
set uses (EXIF orientation applied), so proposals live in the same pixel frame
as the images the detector sees.

Bounded time. Selective search takes minutes on a large image and longer on a
thin strip (a 20000 x 10 PNG ran for over three minutes at 5 GB). Every image
is checked against :class:`~sppnet.data.limits.ImageLimits` from its header,
before it is decoded or searched: pixels, aspect ratio, short side, and the
pixels of the copy actually searched (``max_search_pixels``, after
``resize_to``). A refusal names the file and the flag that raises the limit.

:func:`sliding_window_proposals` is a cheap, deterministic stand-in (dense boxes
at a few scales and aspect ratios) for tests and benchmarks.

Where each part lives:

* :mod:`~sppnet.data.proposals.search` - :class:`SelectiveSearchParams`,
  :func:`selective_search` (one image) and :func:`check_search_limits`;
* :mod:`~sppnet.data.proposals.cache` - :class:`ProposalCache` and
  :func:`compute_proposals` (many files, cached, in worker processes);
* :mod:`~sppnet.data.proposals.windows` - :func:`add_ground_truth` and
  :func:`sliding_window_proposals`.
"""

from sppnet.data.proposals.cache import ProposalCache, compute_proposals
from sppnet.data.proposals.search import SelectiveSearchParams, check_search_limits, selective_search
from sppnet.data.proposals.windows import add_ground_truth, sliding_window_proposals

__all__ = [
    "ProposalCache",
    "SelectiveSearchParams",
    "add_ground_truth",
    "check_search_limits",
    "compute_proposals",
    "selective_search",
    "sliding_window_proposals",
]
