"""CPU kernels (numba) for max pyramid pooling over windows, with argmax.

Three kernels, all exact and all deriving each coarser level that divides a
finer one from the finer bins (adaptive bins nest: ``level_sources`` in
``ops/_bins.py``):

* ``scan_*``: channels-last, parallel over windows; each bin row is the
  elementwise max of its map rows, then each bin the max of its columns.
  Few or small windows, and the image-level pyramid of big batches of small
  maps (the whole map is each image's window).
* ``roi_pyramid_*``: a 2-D sparse table (power-of-two block maxima) built once
  per map, then four look-ups per bin. Many windows.
* ``plane_pyramid_max``: the image level on large maps or small batches, in
  the input's own [N, C, H, W] layout, parallel over (image, channel) planes.

Each has a values-only form (no gradient needed) and one that also keeps the
argmax as a cell index ``y*W + x`` (int16 while the map has at most 32,767
cells, int32 beyond), from which ``roi_pyramid_max_backward`` scatters the
gradient.

Every function here has a pure-PyTorch counterpart in ``roi_spp.py`` /
``spp.py``; these kernels are used only where numba is importable, on CPU, for
float32 / float64, and never while tracing or exporting.
"""

from __future__ import annotations

import functools

import numpy as np

from sppnet.ops._bins import level_sources

try:  # numba is a hard dependency, but the operators keep working without it.
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only on installs without numba
    HAVE_NUMBA = False


@functools.lru_cache(maxsize=64)
def make_plan(levels: tuple[int, ...], channels: int) -> tuple[np.ndarray, ...]:
    """Arrays that tell the kernel what to compute and where to write it (cached per
    ``(levels, channels)``: the kernels only read them).

    Returns:
        ``(lv, src, out_off, buf_off, order)``: ``lv[l]`` bins per side of level
        ``l`` (output order); ``src[l]`` the index of a finer level that ``lv[l]``
        divides (derive from it) or -1 (read the map); ``out_off[l]`` where the
        level starts in the output row (``channels * sum of earlier n*n``);
        ``buf_off[l]`` its first bin in a window's buffer (``buf_off[L]`` = all
        bins); ``order`` a processing order in which sources come first.
    """
    lv = np.asarray(levels, dtype=np.int64)
    out_off = np.zeros(len(levels), dtype=np.int64)
    acc = 0
    for i, n in enumerate(levels):
        out_off[i] = acc
        acc += channels * n * n
    sources = level_sources(levels)
    first: dict[int, int] = {}  # level size -> index of its first occurrence
    for i, n in enumerate(levels):
        first.setdefault(n, i)
    src = np.full(len(levels), -1, dtype=np.int64)
    for i, n in enumerate(levels):
        if i != first[n]:
            src[i] = first[n]  # a repeated level copies its first occurrence
        elif sources[n] is not None:
            src[i] = first[sources[n]]
    order = sorted(range(len(levels)), key=lambda i: (-levels[i], i))
    buf_off = np.concatenate([[0], np.cumsum(lv * lv)]).astype(np.int64)
    return lv, src, out_off, buf_off, np.asarray(order, dtype=np.int64)


if HAVE_NUMBA:

    @njit(cache=True, nogil=True, inline="always")
    def _floor_log2(v):  # pragma: no cover
        a = 0
        while (2 << a) <= v:
            a += 1
        return a

    # Elementwise max of channel rows, written as plain loops that LLVM
    # vectorises: a select for the values and an arithmetic blend
    # ``a + m * (b - a)`` for the argmax (a select on the int32 index stops
    # the vectoriser). NaN rule: a NaN wins over a number
    # and, once there, stays (torch's pooling propagates NaN); between equal
    # values the first row wins.

    @njit(cache=True, nogil=True, inline="always")
    def _max_rows(v1, a1, v2, a2, dv, da):  # pragma: no cover
        """dv, da = elementwise (max, argmax) of (v1, a1) and (v2, a2); ties keep 1."""
        for c in range(v1.shape[0]):
            x = v1[c]
            y = v2[c]
            m = (y > x) | ((y != y) & (x == x))
            dv[c] = y if m else x
            p = a1[c]
            da[c] = p + np.int32(m) * (a2[c] - p)

    @njit(cache=True, nogil=True, inline="always")
    def _max_row_cell(dv, da, v, p):  # pragma: no cover
        """dv, da = elementwise (max, argmax) of (dv, da) and (v, the cell index p)."""
        for c in range(dv.shape[0]):
            x = dv[c]
            y = v[c]
            m = (y > x) | ((y != y) & (x == x))
            dv[c] = y if m else x
            q = da[c]
            da[c] = q + m * (p - q)

    @njit(cache=True, nogil=True, inline="always")
    def _max_rows_values(v1, v2, dv):  # pragma: no cover
        """dv = elementwise max of v1 and v2 (NaN wins)."""
        for c in range(v1.shape[0]):
            x = v1[c]
            y = v2[c]
            m = (y > x) | ((y != y) & (x == x))
            dv[c] = y if m else x

    @njit(cache=True, nogil=True, inline="always")
    def _max4_rows(v0, a0, v1, a1, v2, a2, v3, a3, dv, da):  # pragma: no cover
        """dv, da = elementwise (max, argmax) of four rows, as a tree of pairs."""
        for c in range(v0.shape[0]):
            x0 = v0[c]
            x1 = v1[c]
            x2 = v2[c]
            x3 = v3[c]
            m = (x1 > x0) | ((x1 != x1) & (x0 == x0))
            lo = x1 if m else x0
            p = a0[c]
            alo = p + np.int32(m) * (a1[c] - p)
            m = (x3 > x2) | ((x3 != x3) & (x2 == x2))
            hi = x3 if m else x2
            p = a2[c]
            ahi = p + np.int32(m) * (a3[c] - p)
            m = (hi > lo) | ((hi != hi) & (lo == lo))
            dv[c] = hi if m else lo
            da[c] = alo + np.int32(m) * (ahi - alo)

    @njit(cache=True, nogil=True, inline="always")
    def _max4_rows_values(v0, v1, v2, v3, dv):  # pragma: no cover
        """dv = elementwise max of four rows (NaN wins)."""
        for c in range(v0.shape[0]):
            x0 = v0[c]
            x1 = v1[c]
            x2 = v2[c]
            x3 = v3[c]
            m = (x1 > x0) | ((x1 != x1) & (x0 == x0))
            lo = x1 if m else x0
            m = (x3 > x2) | ((x3 != x3) & (x2 == x2))
            hi = x3 if m else x2
            m = (hi > lo) | ((hi != hi) & (lo == lo))
            dv[c] = hi if m else lo

    @njit(parallel=True, cache=True, nogil=True)
    def build_max_tables(feat, val, arg):  # pragma: no cover
        """2-D sparse table with argmax, channels last.

        ``val[a, b, n, y, x, c]`` = max of ``feat[n, y:y+2^a, x:x+2^b, c]`` (block
        cut at the map's edge); ``arg`` holds its cell index ``y*W + x`` (the
        channel is implied by ``c``).
        Ties keep the top-left cell; a NaN wins and stays (torch's pooling rule).
        """
        la, lb, n_img, height, width, chans = val.shape
        for t in prange(n_img * height):
            n = t // height
            y = t - n * height
            for x in range(width):
                val[0, 0, n, y, x, :] = feat[n, y, x, :]
                arg[0, 0, n, y, x, :] = y * width + x
        for b in range(1, lb):
            s = 1 << (b - 1)
            for t in prange(n_img * height):
                n = t // height
                y = t - n * height
                src_v = val[0, b - 1, n, y]
                src_a = arg[0, b - 1, n, y]
                for x in range(width):
                    x2 = min(x + s, width - 1)
                    _max_rows(src_v[x], src_a[x], src_v[x2], src_a[x2], val[0, b, n, y, x], arg[0, b, n, y, x])
        for a in range(1, la):
            s = 1 << (a - 1)
            for t in prange(n_img * height):
                n = t // height
                y = t - n * height
                y2 = min(y + s, height - 1)
                for b in range(lb):
                    v_top = val[a - 1, b, n, y]
                    a_top = arg[a - 1, b, n, y]
                    v_bot = val[a - 1, b, n, y2]
                    a_bot = arg[a - 1, b, n, y2]
                    for x in range(width):
                        _max_rows(v_top[x], a_top[x], v_bot[x], a_bot[x], val[a, b, n, y, x], arg[a, b, n, y, x])

    @njit(cache=True, nogil=True)
    def _derive_and_write(k, buf, bufa, lv, src, out_off, buf_off, order, out, out_arg):  # pragma: no cover
        """Derived levels from finer ones (in the window's buffer), then the
        transposed write of every level into the output row ``k``.

        ``buf[buf_off[l] + i*n + j, c]`` holds bin (i, j) of level ``l``, channel
        ``c`` (channels last, so the max over channels vectorises); the output
        wants ``c*n*n + i*n + j``.
        """
        chans = buf.shape[1]
        n_lv = lv.shape[0]
        for q in range(n_lv):
            li = order[q]
            s = src[li]
            if s < 0:
                continue
            n = lv[li]
            nf = lv[s]
            kk = nf // n
            for i in range(n):
                for j in range(n):
                    dst = buf[buf_off[li] + i * n + j]
                    dsta = bufa[buf_off[li] + i * n + j]
                    f0 = buf_off[s] + (i * kk) * nf + j * kk
                    dst[:] = buf[f0]
                    dsta[:] = bufa[f0]
                    for a in range(kk):
                        for bb in range(kk):
                            f = buf_off[s] + (i * kk + a) * nf + (j * kk + bb)
                            _max_rows(dst, dsta, buf[f], bufa[f], dst, dsta)
        orow = out[k]
        arow = out_arg[k]
        for li in range(n_lv):
            nn = lv[li] * lv[li]
            base = out_off[li]
            boff = buf_off[li]
            for c in range(chans):
                for o in range(nn):
                    orow[base + c * nn + o] = buf[boff + o, c]
                    arow[base + c * nn + o] = bufa[boff + o, c]

    @njit(parallel=True, cache=True, nogil=True)
    def roi_pyramid_max_forward(val, arg, rois, lv, src, out_off, buf_off, order, out, out_arg):  # pragma: no cover
        """out[k, off + c*n*n + i*n + j] = max of bin (i, j) of window k, channel c.

        Directly computed levels take the max of four overlapping power-of-two
        blocks of the sparse table (``build_max_tables``); derived levels the
        max over the finer bins they are made of. ``out_arg`` gets the cell
        index ``y*W + x`` of the maximum (its channel is the column's).
        """
        n_win = rois.shape[0]
        chans = val.shape[5]
        n_lv = lv.shape[0]
        total = buf_off[n_lv]
        for k in prange(n_win):
            b = rois[k, 0]
            x1 = rois[k, 1]
            y1 = rois[k, 2]
            h = rois[k, 4] - y1 + 1
            w = rois[k, 3] - x1 + 1
            buf = np.empty((total, chans), val.dtype)
            bufa = np.empty((total, chans), out_arg.dtype)
            for li in range(n_lv):
                if src[li] >= 0:
                    continue
                n = lv[li]
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
                        t = val[ka, kb, b]
                        ta = arg[ka, kb, b]
                        _max4_rows(
                            t[rs, cs],
                            ta[rs, cs],
                            t[rs, c1],
                            ta[rs, c1],
                            t[r1, cs],
                            ta[r1, cs],
                            t[r1, c1],
                            ta[r1, c1],
                            buf[buf_off[li] + i * n + j],
                            bufa[buf_off[li] + i * n + j],
                        )
            _derive_and_write(k, buf, bufa, lv, src, out_off, buf_off, order, out, out_arg)

    @njit(parallel=True, cache=True, nogil=True)
    def scan_pyramid_max_forward(feat, rois, lv, src, out_off, buf_off, order, out, out_arg):  # pragma: no cover
        """Like ``roi_pyramid_max_forward`` but reads every bin cell by cell from
        the channels-last map ``feat[N, H, W, C]``; cheaper than building a sparse
        table when the windows are few or small (the image-level pyramid)."""
        n_win = rois.shape[0]
        width = feat.shape[2]
        chans = feat.shape[3]
        n_lv = lv.shape[0]
        total = buf_off[n_lv]
        for k in prange(n_win):
            b = rois[k, 0]
            x1 = rois[k, 1]
            y1 = rois[k, 2]
            h = rois[k, 4] - y1 + 1
            w = rois[k, 3] - x1 + 1
            buf = np.empty((total, chans), feat.dtype)
            bufa = np.empty((total, chans), out_arg.dtype)
            rmax = np.empty((w, chans), feat.dtype)
            rarg = np.empty((w, chans), out_arg.dtype)
            img = feat[b]
            for li in range(n_lv):
                if src[li] >= 0:
                    continue
                n = lv[li]
                for i in range(n):
                    # Separable: the bin row's max over its map rows, per column
                    # (rmax), then each bin's max over its columns of rmax.
                    rs = y1 + (i * h) // n
                    re = y1 + ((i + 1) * h + n - 1) // n
                    for xx in range(w):
                        rmax[xx] = img[rs, x1 + xx]
                        rarg[xx] = rs * width + x1 + xx
                    for yy in range(rs + 1, re):
                        for xx in range(w):
                            _max_row_cell(rmax[xx], rarg[xx], img[yy, x1 + xx], yy * width + x1 + xx)
                    for j in range(n):
                        cs = (j * w) // n
                        ce = ((j + 1) * w + n - 1) // n
                        dst = buf[buf_off[li] + i * n + j]
                        dsta = bufa[buf_off[li] + i * n + j]
                        dst[:] = rmax[cs]
                        dsta[:] = rarg[cs]
                        for xx in range(cs + 1, ce):
                            _max_rows(dst, dsta, rmax[xx], rarg[xx], dst, dsta)
            _derive_and_write(k, buf, bufa, lv, src, out_off, buf_off, order, out, out_arg)

    # ------------------------------------------------------------------
    # Values only (no argmax): used when no gradient is needed (inference,
    # detection); half the memory traffic of the argmax kernels.

    @njit(cache=True, nogil=True)
    def _derive_and_write_values(k, buf, lv, src, out_off, buf_off, order, out):  # pragma: no cover
        n_lv = lv.shape[0]
        for q in range(n_lv):
            li = order[q]
            s = src[li]
            if s < 0:
                continue
            n = lv[li]
            nf = lv[s]
            kk = nf // n
            for i in range(n):
                for j in range(n):
                    dst = buf[buf_off[li] + i * n + j]
                    dst[:] = buf[buf_off[s] + (i * kk) * nf + j * kk]
                    for a in range(kk):
                        for bb in range(kk):
                            _max_rows_values(dst, buf[buf_off[s] + (i * kk + a) * nf + (j * kk + bb)], dst)
        orow = out[k]
        chans = buf.shape[1]
        for li in range(n_lv):
            nn = lv[li] * lv[li]
            base = out_off[li]
            boff = buf_off[li]
            for c in range(chans):
                for o in range(nn):
                    orow[base + c * nn + o] = buf[boff + o, c]

    @njit(parallel=True, cache=True, nogil=True)
    def scan_pyramid_max_values(feat, rois, lv, src, out_off, buf_off, order, out):  # pragma: no cover
        """Values-only ``scan_pyramid_max_forward`` on the channels-last map."""
        n_win = rois.shape[0]
        chans = feat.shape[3]
        n_lv = lv.shape[0]
        total = buf_off[n_lv]
        for k in prange(n_win):
            b = rois[k, 0]
            x1 = rois[k, 1]
            y1 = rois[k, 2]
            h = rois[k, 4] - y1 + 1
            w = rois[k, 3] - x1 + 1
            buf = np.empty((total, chans), feat.dtype)
            rmax = np.empty((w, chans), feat.dtype)
            img = feat[b]
            for li in range(n_lv):
                if src[li] >= 0:
                    continue
                n = lv[li]
                for i in range(n):
                    rs = y1 + (i * h) // n
                    re = y1 + ((i + 1) * h + n - 1) // n
                    rmax[:] = img[rs, x1 : x1 + w]
                    for yy in range(rs + 1, re):
                        for xx in range(w):
                            _max_rows_values(rmax[xx], img[yy, x1 + xx], rmax[xx])
                    for j in range(n):
                        cs = (j * w) // n
                        ce = ((j + 1) * w + n - 1) // n
                        dst = buf[buf_off[li] + i * n + j]
                        dst[:] = rmax[cs]
                        for xx in range(cs + 1, ce):
                            _max_rows_values(dst, rmax[xx], dst)
            _derive_and_write_values(k, buf, lv, src, out_off, buf_off, order, out)

    @njit(parallel=True, cache=True, nogil=True)
    def build_max_tables_values(feat, val):  # pragma: no cover
        """Values-only ``build_max_tables``."""
        la, lb, n_img, height, width, chans = val.shape
        for t in prange(n_img * height):
            n = t // height
            y = t - n * height
            val[0, 0, n, y] = feat[n, y]
            for b in range(1, lb):
                s = 1 << (b - 1)
                prev = val[0, b - 1, n, y]
                cur = val[0, b, n, y]
                for x in range(width):
                    _max_rows_values(prev[x], prev[min(x + s, width - 1)], cur[x])
        for a in range(1, la):
            s = 1 << (a - 1)
            for t in prange(n_img * height):
                n = t // height
                y = t - n * height
                y2 = min(y + s, height - 1)
                for b in range(lb):
                    _max_rows_values(
                        val[a - 1, b, n, y].reshape(-1), val[a - 1, b, n, y2].reshape(-1), val[a, b, n, y].reshape(-1)
                    )

    @njit(parallel=True, cache=True, nogil=True)
    def roi_pyramid_max_values(val, rois, lv, src, out_off, buf_off, order, out):  # pragma: no cover
        """Values-only ``roi_pyramid_max_forward`` from the sparse table."""
        n_win = rois.shape[0]
        chans = val.shape[5]
        n_lv = lv.shape[0]
        total = buf_off[n_lv]
        for k in prange(n_win):
            b = rois[k, 0]
            x1 = rois[k, 1]
            y1 = rois[k, 2]
            h = rois[k, 4] - y1 + 1
            w = rois[k, 3] - x1 + 1
            buf = np.empty((total, chans), val.dtype)
            for li in range(n_lv):
                if src[li] >= 0:
                    continue
                n = lv[li]
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
                        t = val[ka, kb, b]
                        dst = buf[buf_off[li] + i * n + j]
                        _max4_rows_values(t[rs, cs], t[rs, c1], t[r1, cs], t[r1, c1], dst)
            _derive_and_write_values(k, buf, lv, src, out_off, buf_off, order, out)

    @njit(parallel=True, cache=True, nogil=True)
    def roi_pyramid_max_backward(grad_out, arg, batch_idx, lv, out_off, grad_in):  # pragma: no cover
        """grad_in[b_k, c, cell] += grad_out[k, d] for every output column d of
        window k (channel c, ``cell = arg[k, d]``), race-free.

        ``grad_in`` is ``[N, C, H*W]``, uninitialised: each thread zeroes its
        own channels first (no separate pass, pages first touched where they
        are used). Parallel over blocks of 16 channels: two threads never write
        the same cell, and a block's columns of each level are contiguous in a
        row of ``grad_out`` (whole cache lines).
        """
        n_win = grad_out.shape[0]
        n_img = grad_in.shape[0]
        chans = grad_in.shape[1]
        n_lv = lv.shape[0]
        n_blk = (chans + 15) // 16
        for blk in prange(n_blk):
            c0 = blk * 16
            c1 = min(chans, c0 + 16)
            for b in range(n_img):
                grad_in[b, c0:c1, :] = 0
            for k in range(n_win):
                gi = grad_in[batch_idx[k]]
                go = grad_out[k]
                ar = arg[k]
                for li in range(n_lv):
                    nn = lv[li] * lv[li]
                    base = out_off[li]
                    for c in range(c0, c1):
                        gc = gi[c]
                        for o in range(base + c * nn, base + (c + 1) * nn):
                            gc[ar[o]] += go[o]

    # ------------------------------------------------------------------
    # Image level on large maps: one pyramid per (image, channel) plane, read in
    # the input's own [N, C, H, W] layout (no channels-last copy) and parallel
    # over planes, so one big image still uses every thread. A bin row is the
    # elementwise max of its map rows (vectorised along x), then each bin the
    # max of its columns of that row.

    @njit(cache=True, nogil=True, inline="always")
    def _plane_derive(orow, base_c, lv, src, out_off, order, with_arg, arow):  # pragma: no cover
        """Derived levels of one plane from finer ones already in ``orow``."""
        for q in range(lv.shape[0]):
            li = order[q]
            s = src[li]
            if s < 0:
                continue
            n = lv[li]
            nf = lv[s]
            kk = nf // n
            so = out_off[s] + base_c * nf * nf
            do = out_off[li] + base_c * n * n
            for i in range(n):
                for j in range(n):
                    f0 = so + (i * kk) * nf + j * kk
                    best = orow[f0]
                    bi = f0
                    for a in range(kk):
                        for bb in range(kk):
                            f = so + (i * kk + a) * nf + (j * kk + bb)
                            v = orow[f]
                            if (v > best) | ((v != v) & (best == best)):
                                best = v
                                bi = f
                    orow[do + i * n + j] = best
                    if with_arg:
                        arow[do + i * n + j] = arow[bi]

    @njit(parallel=True, cache=True, nogil=True)
    def plane_pyramid_max(x, lv, src, out_off, order, out, out_arg, with_arg):  # pragma: no cover
        """``out[b, off + c*n*n + i*n + j]`` = max of bin (i, j) of ``x[b, c]``;
        with ``with_arg`` also the cell index ``y*W + x`` of that max in ``out_arg``."""
        n_img, chans, height, width = x.shape
        n_lv = lv.shape[0]
        # Planes in contiguous blocks, parallel over blocks: the row buffers are
        # allocated once a block, not once a plane (13x13 maps: 16k planes).
        n_planes = n_img * chans
        n_blk = min(n_planes, 256)
        for blk in prange(n_blk):
            rmax = np.empty(width, x.dtype)
            rarg = np.empty(width, out_arg.dtype)
            for t in range((blk * n_planes) // n_blk, ((blk + 1) * n_planes) // n_blk):
                b = t // chans
                c = t - b * chans
                plane = x[b, c]
                orow = out[b]
                arow = out_arg[b]
                for li in range(n_lv):
                    if src[li] >= 0:
                        continue
                    n = lv[li]
                    do = out_off[li] + c * n * n
                    for i in range(n):
                        rs = (i * height) // n
                        re = ((i + 1) * height + n - 1) // n
                        rmax[:] = plane[rs]
                        if with_arg:
                            rarg[:] = rs
                        for yy in range(rs + 1, re):
                            row = plane[yy]
                            for xx in range(width):
                                v = row[xx]
                                d = rmax[xx]
                                m = (v > d) | ((v != v) & (d == d))
                                rmax[xx] = v if m else d
                                if with_arg:
                                    q = rarg[xx]
                                    rarg[xx] = q + m * (yy - q)
                        for j in range(n):
                            cs = (j * width) // n
                            ce = ((j + 1) * width + n - 1) // n
                            best = rmax[cs]
                            bx = cs
                            for xx in range(cs + 1, ce):
                                v = rmax[xx]
                                if (v > best) | ((v != v) & (best == best)):
                                    best = v
                                    bx = xx
                            orow[do + i * n + j] = best
                            if with_arg:
                                arow[do + i * n + j] = rarg[bx] * width + bx
                _plane_derive(orow, c, lv, src, out_off, order, with_arg, arow)

    def set_threads(n: int) -> None:
        """Runs the kernels on ``n`` threads (torch's count) and leaves torch's count at ``n``.

        numba's ``omp`` threading layer shares the OpenMP runtime with torch:
        starting its pool (the first parallel call) sets the process's OpenMP
        thread count to ``NUMBA_NUM_THREADS`` (the core count), which silently
        undid ``torch.set_num_threads(1)``: 4 s instead of 0.3 s per training
        step of the ``small`` classifier on a loaded 2-core machine.
        """
        import torch

        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
