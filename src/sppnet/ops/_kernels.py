"""CPU kernels (numba) for max pyramid pooling over windows, with argmax.

One kernel serves both operators: the image-level pyramid is the window-level
one with the whole map as the window of each image. Work is split over
``(window, channel)`` pairs; each pair reads its window once for the finest
directly-computed level and derives the coarser levels that divide it from the
finer bins (adaptive bins nest: see ``ops/spp.py``).

Every function here has a pure-PyTorch counterpart in ``roi_spp.py`` /
``spp.py``; these kernels are used only where numba is importable, on CPU, for
float32 / float64, and never while tracing or exporting.
"""

from __future__ import annotations

import numpy as np

try:  # numba is a hard dependency, but the operators keep working without it.
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only on installs without numba
    HAVE_NUMBA = False


def make_plan(levels: tuple[int, ...], channels: int) -> tuple[np.ndarray, ...]:
    """Arrays that tell the kernel what to compute and where to write it.

    Returns:
        ``(lv, src, out_off, order)``: ``lv[l]`` bins per side of level ``l``
        (output order); ``src[l]`` the index of a finer level that ``lv[l]``
        divides (derive from it) or -1 (read the map); ``out_off[l]`` where the
        level starts in the output row (``channels * sum of earlier n*n``);
        ``order`` a processing order in which sources come first.
    """
    lv = np.asarray(levels, dtype=np.int64)
    out_off = np.zeros(len(levels), dtype=np.int64)
    acc = 0
    for i, n in enumerate(levels):
        out_off[i] = acc
        acc += channels * n * n
    src = np.full(len(levels), -1, dtype=np.int64)
    order: list[int] = []
    done: dict[int, int] = {}  # level size -> index of its first occurrence
    for i in sorted(range(len(levels)), key=lambda i: (-levels[i], i)):
        n = levels[i]
        cands = [done[m] for m in done if m % n == 0]
        if cands:
            src[i] = min(cands, key=lambda j: levels[j])
        done.setdefault(n, i)
        order.append(i)
    return lv, src, out_off, np.asarray(order, dtype=np.int64)


if HAVE_NUMBA:

    @njit(cache=True, nogil=True, inline="always")
    def _floor_log2(v):  # pragma: no cover
        a = 0
        while (2 << a) <= v:
            a += 1
        return a

    @njit(parallel=True, cache=True, nogil=True)
    def build_max_tables(feat, val, arg):  # pragma: no cover
        """2-D sparse table with argmax, channels last.

        ``val[a, b, n, y, x, c]`` = max of ``feat[n, y:y+2^a, x:x+2^b, c]`` (block
        cut at the map's edge); ``arg`` holds its flat index ``c*H*W + y*W + x``.
        Ties keep the top-left cell; a NaN wins and stays (torch's pooling rule).
        """
        la, lb, n_img, height, width, chans = val.shape
        for t in prange(n_img * height):
            n = t // height
            y = t - n * height
            for x in range(width):
                for c in range(chans):
                    val[0, 0, n, y, x, c] = feat[n, y, x, c]
                    arg[0, 0, n, y, x, c] = (c * height + y) * width + x
        for b in range(1, lb):
            s = 1 << (b - 1)
            for t in prange(n_img * height):
                n = t // height
                y = t - n * height
                for x in range(width):
                    x2 = min(x + s, width - 1)
                    for c in range(chans):
                        v1 = val[0, b - 1, n, y, x, c]
                        v2 = val[0, b - 1, n, y, x2, c]
                        if v2 > v1 or (v2 != v2 and v1 == v1):
                            val[0, b, n, y, x, c] = v2
                            arg[0, b, n, y, x, c] = arg[0, b - 1, n, y, x2, c]
                        else:
                            val[0, b, n, y, x, c] = v1
                            arg[0, b, n, y, x, c] = arg[0, b - 1, n, y, x, c]
        for a in range(1, la):
            s = 1 << (a - 1)
            for t in prange(n_img * height):
                n = t // height
                y = t - n * height
                y2 = min(y + s, height - 1)
                for b in range(lb):
                    for x in range(width):
                        for c in range(chans):
                            v1 = val[a - 1, b, n, y, x, c]
                            v2 = val[a - 1, b, n, y2, x, c]
                            if v2 > v1 or (v2 != v2 and v1 == v1):
                                val[a, b, n, y, x, c] = v2
                                arg[a, b, n, y, x, c] = arg[a - 1, b, n, y2, x, c]
                            else:
                                val[a, b, n, y, x, c] = v1
                                arg[a, b, n, y, x, c] = arg[a - 1, b, n, y, x, c]

    @njit(parallel=True, cache=True, nogil=True)
    def roi_pyramid_max_forward(val, arg, rois, lv, src, out_off, order, out, out_arg):  # pragma: no cover
        """out[k, off + c*n*n + i*n + j] = max of bin (i, j) of window k, channel c.

        Directly computed levels take the max of four overlapping power-of-two
        blocks of the sparse table; derived levels take the max over the finer
        bins they are made of. ``out_arg`` gets the flat index ``c*H*W + y*W + x``
        of the maximum inside the image.
        """
        n_win = rois.shape[0]
        chans = val.shape[5]
        n_lv = lv.shape[0]
        for k in prange(n_win):
            b = rois[k, 0]
            x1 = rois[k, 1]
            y1 = rois[k, 2]
            h = rois[k, 4] - y1 + 1
            w = rois[k, 3] - x1 + 1
            for q in range(n_lv):
                li = order[q]
                n = lv[li]
                nn = n * n
                base = out_off[li]
                s = src[li]
                if s < 0:
                    for i in range(n):
                        rs = y1 + (i * h) // n
                        re = y1 + ((i + 1) * h + n - 1) // n
                        ka = _floor_log2(re - rs)
                        r1 = re - (1 << ka)
                        for j in range(n):
                            cs = x1 + (j * w) // n
                            ce = x1 + ((j + 1) * w + n - 1) // n
                            kb = _floor_log2(ce - cs)
                            c1 = ce - (1 << kb)
                            o = base + i * n + j
                            for c in range(chans):
                                best = val[ka, kb, b, rs, cs, c]
                                bi = arg[ka, kb, b, rs, cs, c]
                                v = val[ka, kb, b, rs, c1, c]
                                if v > best or (v != v and best == best):
                                    best = v
                                    bi = arg[ka, kb, b, rs, c1, c]
                                v = val[ka, kb, b, r1, cs, c]
                                if v > best or (v != v and best == best):
                                    best = v
                                    bi = arg[ka, kb, b, r1, cs, c]
                                v = val[ka, kb, b, r1, c1, c]
                                if v > best or (v != v and best == best):
                                    best = v
                                    bi = arg[ka, kb, b, r1, c1, c]
                                out[k, o + c * nn] = best
                                out_arg[k, o + c * nn] = bi
                else:
                    nf = lv[s]
                    fbase = out_off[s]
                    nnf = nf * nf
                    kk = nf // n
                    for c in range(chans):
                        for i in range(n):
                            for j in range(n):
                                f0 = fbase + c * nnf + (i * kk) * nf + j * kk
                                best = out[k, f0]
                                bi = out_arg[k, f0]
                                for a in range(kk):
                                    for bb in range(kk):
                                        f = fbase + c * nnf + (i * kk + a) * nf + (j * kk + bb)
                                        v = out[k, f]
                                        if v > best or (v != v and best == best):
                                            best = v
                                            bi = out_arg[k, f]
                                out[k, base + c * nn + i * n + j] = best
                                out_arg[k, base + c * nn + i * n + j] = bi

    @njit(parallel=True, cache=True, nogil=True)
    def scan_pyramid_max_forward(feat, rois, lv, src, out_off, order, out, out_arg):  # pragma: no cover
        """Like ``roi_pyramid_max_forward`` but reads every bin cell by cell.

        Parallel over (window, channel) on the NCHW map; cheaper than building a
        sparse table when there are few windows (the image-level pyramid).
        """
        n_win = rois.shape[0]
        chans = feat.shape[1]
        width = feat.shape[3]
        plane = feat.shape[2] * width
        n_lv = lv.shape[0]
        for t in prange(n_win * chans):
            k = t // chans
            c = t - k * chans
            b = rois[k, 0]
            x1 = rois[k, 1]
            y1 = rois[k, 2]
            h = rois[k, 4] - y1 + 1
            w = rois[k, 3] - x1 + 1
            for q in range(n_lv):
                li = order[q]
                n = lv[li]
                base = out_off[li] + c * n * n
                s = src[li]
                if s < 0:
                    for i in range(n):
                        rs = y1 + (i * h) // n
                        re = y1 + ((i + 1) * h + n - 1) // n
                        for j in range(n):
                            cs = x1 + (j * w) // n
                            ce = x1 + ((j + 1) * w + n - 1) // n
                            best = feat[b, c, rs, cs]
                            bi = rs * width + cs
                            for yy in range(rs, re):
                                for xx in range(cs, ce):
                                    v = feat[b, c, yy, xx]
                                    if v > best or (v != v and best == best):
                                        best = v
                                        bi = yy * width + xx
                            out[k, base + i * n + j] = best
                            out_arg[k, base + i * n + j] = c * plane + bi
                else:
                    nf = lv[s]
                    fbase = out_off[s] + c * nf * nf
                    kk = nf // n
                    for i in range(n):
                        for j in range(n):
                            f0 = fbase + (i * kk) * nf + j * kk
                            best = out[k, f0]
                            bi = out_arg[k, f0]
                            for a in range(kk):
                                for bb in range(kk):
                                    f = fbase + (i * kk + a) * nf + (j * kk + bb)
                                    v = out[k, f]
                                    if v > best or (v != v and best == best):
                                        best = v
                                        bi = out_arg[k, f]
                            out[k, base + i * n + j] = best
                            out_arg[k, base + i * n + j] = bi

    @njit(parallel=True, cache=True, nogil=True)
    def roi_pyramid_max_backward(grad_out, arg, batch_idx, cols_of_chan, grad_in):  # pragma: no cover
        """grad_in[b_k, arg[k, d]] += grad_out[k, d], race-free.

        ``grad_in`` is ``[N, C*H*W]``. Parallel over channels: ``cols_of_chan[c]``
        lists the output columns that read channel ``c``, so two threads never
        write the same cell.
        """
        n_win = grad_out.shape[0]
        chans = cols_of_chan.shape[0]
        n_bins = cols_of_chan.shape[1]
        for c in prange(chans):
            for k in range(n_win):
                b = batch_idx[k]
                for t in range(n_bins):
                    d = cols_of_chan[c, t]
                    grad_in[b, arg[k, d]] += grad_out[k, d]

    def set_threads(n: int) -> None:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
