"""Channels-last (NHWC) inference kernels on row bands: the loops of the eval engine.

Legend: one image at a time, pixels row-major and channels innermost: an activation of C
channels on an H x W grid is a flat array ``a[(i * W + j) * C + c]`` (or its (H*W, C) view).
``[o0, o1)`` is a range of *output rows*: a kernel computes only those rows, so the engine can
hand row bands to threads, or run a 1x1 expansion and the depthwise conv that reads it band by
band while the band is in cache. ``kc`` = ``epilogue.consts`` packed in an array (0, 3, 6) of the
data's dtype; ``act`` an ``epilogue.ACT_CODES`` code. A conv's geometry is the tuple
``geom = (H, W, Ho, Wo, k, s, p, d)`` (input size, output size, kernel, stride, padding,
dilation), the meaning torch gives them.

Every loop keeps the channel index innermost over contiguous memory, so LLVM vectorises it (8
float32 lanes with AVX2) whatever the kernel size; padding is handled by clipping each tap's
range of output columns instead of materialising a padded copy. Batch norm is already folded
into the weights and biases (``npmnv3/engine/plan.py``), so every conv is ``act(conv + b)``.
These are public entry points: ``npmnv3.engine`` calls them from its Numba drivers and the
tests call them directly against the NCHW reference kernels.

Compile time: Numba compiles a called ``njit`` function on its own (to machine code, cached)
and then optimises and emits it again inside each caller it is linked into. The kernels that
one engine step alone calls (``conv_rows`` and its ``im2col_row``, ``se_gate``,
``scale_channels``, ``linear_rows``) are therefore ``inline="always"``: Numba inlines their
code when it compiles the step, and they are compiled once, inside it (the engine's whole
compile on an empty cache, in one process: 15.7-18.3 s before, 13.4-16.1 s after;
benchmarks/README.md). ``pointwise`` and ``bias_act`` are shared by several steps, and
inlining ``depthwise_rows`` measured no gain.
"""

from __future__ import annotations

from numba import njit

from .blas import gemm
from .epilogue import HARDSIGMOID, apply_act


@njit(cache=True, inline="always")
def col_range(off, s, W, Wo):
    """Output columns j whose tap input column j*s + off lies inside [0, W): (jlo, jhi)."""
    jlo = 0 if off >= 0 else (-off + s - 1) // s
    jhi = min(Wo, (W - 1 - off) // s + 1)
    return jlo, max(jlo, jhi)


@njit(cache=True)
def bias_act(y, b, act, kc):
    """In place, y (P, C): y = act(y + b[c]). The branch on ``act`` sits outside the loops so
    each loop is specialised (and vectorised) for one activation."""
    z, three, six = kc[0], kc[1], kc[2]
    P, C = y.shape
    if act == 1:
        for q in range(P):
            for c in range(C):
                y[q, c] = apply_act(y[q, c] + b[c], 1, z, three, six)
    elif act == 2:
        for q in range(P):
            for c in range(C):
                y[q, c] = apply_act(y[q, c] + b[c], 2, z, three, six)
    else:
        for q in range(P):
            for c in range(C):
                y[q, c] = y[q, c] + b[c]


@njit(cache=True)
def pointwise(x, w, b, act, kc, out, res):
    """1x1 conv of P pixels: out (P, K) = act(x (P, C) @ w (C, K) + b), then + res (P, K) if
    ``res`` is not empty (the residual add: only after the linear projection, act 0).

    One single-threaded sgemm (BLAS through SciPy's cython_blas) then the epilogue on the rows
    just written, while they are in cache.
    """
    gemm(x, w, out)
    bias_act(out, b, act, kc)
    if res.shape[0]:
        P, K = out.shape
        for q in range(P):
            for c in range(K):
                out[q, c] += res[q, c]


@njit(cache=True)
def depthwise_rows(src, lo, w, b, geom, act, kc, o0, o1, acc, out, pool):
    """Depthwise conv, output rows [o0, o1): out[i, j, c] = act(b[c] + sum_{u,v} w[u*k+v, c]
    * x[i*s - p + u*d, j*s - p + v*d, c]), zero outside the image.

    src (rows, W, C): input rows [lo, lo + rows) (the whole image with lo = 0, or a band of an
    expansion); w (k*k, C); out (Ho, Wo, C); acc (Wo, C) scratch; pool (float64, C): receives
    the sum of every output value per channel (SE's squeeze) when it is not empty.

    Two loops add the same terms in the same order (b, then the taps row by row) into acc:
    - 3x3 kernels inside the image (every tap of the pixel reads a real input: most pixels),
      one pass per output pixel, the channel loop outside and the 9 taps unrolled inside it:
      the sum stays in a register and each tap costs one load of x and one of w (tap by tap,
      below, it also loads and stores acc: 2x slower at 16 channels, 1.3-1.6x at 64-480;
      benchmarks/README.md). 5x5 kernels stay on the tap loop: unrolling their 25 taps too
      added ~0.7 s (40 %) to this kernel's compile for 3-15 % on those layers;
    - elsewhere, tap by tap: ``acc[j] += w_uv * x`` over the columns where the tap is inside,
      which is zero padding without a padded copy.
    The activation (and the SE squeeze) follow on each output row while it is in cache. The
    channel loops index with ``range`` variables only, so no negative-index check blocks LLVM's
    vectoriser.
    """
    H, W, Ho, Wo, k, s, p, d = geom
    C = w.shape[1]
    z, three, six = kc[0], kc[1], kc[2]
    span = (k - 1) * d                      # a pixel's taps cover span + 1 rows and columns
    jlo = min(Wo, (p + s - 1) // s)         # the columns whose taps are all inside: [jlo, jhi)
    jhi = max(jlo, min(Wo, (W - 1 - span + p) // s + 1))
    for i in range(o0, o1):
        i0 = i * s - p
        ja, jb = Wo, Wo                     # the interior columns done here: [ja, jb)
        if k == 3 and i0 >= 0 and i0 + span < H:
            x = src[i0 - lo:i0 - lo + span + 1]             # the rows output row i reads
            ja, jb = jlo, jhi
            for j in range(jlo, jhi):
                j0 = j * s - p
                aj = acc[j]
                for c in range(C):
                    a = b[c]
                    for u in range(3):
                        for v in range(3):
                            a += w[u * 3 + v, c] * x[u * d, j0 + v * d, c]
                    aj[c] = a
        for j in range(Wo):
            if j < ja or j >= jb:
                for c in range(C):
                    acc[j, c] = b[c]
        for u in range(k):
            ii = i0 + u * d
            if ii < 0 or ii >= H:
                continue
            row = src[ii - lo]                              # (W, C)
            for v in range(k):
                off = v * d - p
                tlo, thi = col_range(off, s, W, Wo)
                wt = w[u * k + v]
                for j in range(tlo, thi):
                    if ja <= j < jb:
                        continue
                    a = acc[j]
                    xv = row[j * s + off]
                    for c in range(C):
                        a[c] += wt[c] * xv[c]
        o = out[i]
        for j in range(Wo):
            for c in range(C):
                o[j, c] = apply_act(acc[j, c], act, z, three, six)
        if pool.shape[0]:
            for j in range(Wo):
                for c in range(C):
                    pool[c] += o[j, c]


@njit(cache=True, inline="always")
def conv_rows(x, w, b, geom, act, kc, o0, o1, cols, out):
    """The stem: a dense 3x3 conv, stride 2, padding 1 (torchvision's first conv, the only
    geometry it has; ``engine.plan`` refuses any other) of a few-channel NCHW image into
    NHWC, output rows [o0, o1).

    x (C, H, W) one image; w (C*9, K) with row (c*3 + u)*3 + v; out (Ho, Wo, K). By bands
    of rows that fit the scratch ``cols`` (flat): im2col transposed, colsT (C*9, rows*Wo), one
    contiguous segment per tap and row (zeros outside the image), then one GEMM
    out_band (rows*Wo, K) = colsT.T @ w and the epilogue on the band while it is in cache.
    """
    Wo = geom[3]                          # (the kernel, stride and padding are fixed)
    C = x.shape[0]
    CKK, K = w.shape
    R = max(1, cols.shape[0] // (CKK * Wo))
    for r0 in range(o0, o1, R):
        r1 = min(o1, r0 + R)
        L = (r1 - r0) * Wo
        ct = cols[:CKK * L].reshape(CKK, L)
        for c in range(C):
            for u in range(3):
                for i in range(r0, r1):
                    im2col_row(x[c], 2 * i - 1 + u, kc[0], ct, (c * 3 + u) * 3, (i - r0) * Wo,
                               Wo)
        band = out[r0:r1].reshape(L, K)
        gemm(ct.T, w, band)
        bias_act(band, b, act, kc)


@njit(cache=True, inline="always")
def im2col_row(x, ii, z, ct, r, q0, Wo):
    """ct[r + v, q0 + j] = x[ii, 2j - 1 + v] for the three taps v of one kernel row (ii: the
    input row it reads) and the Wo output columns j, z outside the image; x (H, W) one channel.

    Taps v = 0, 1, 2 read columns 2j - 1, 2j, 2j + 1, so one pass over the row's column pairs
    (2q, 2q + 1) writes all three segments with contiguous stores: 5x faster than a strided
    copy per tap (benchmarks/README.md, "The stem's im2col").
    """
    H, W = x.shape
    s0, s1, s2 = ct[r, q0:q0 + Wo], ct[r + 1, q0:q0 + Wo], ct[r + 2, q0:q0 + Wo]
    if ii < 0 or ii >= H:
        for j in range(Wo):
            s0[j] = z
            s1[j] = z
            s2[j] = z
        return
    xr = x[ii]
    nh = W // 2
    m = min(nh, Wo - 1)                  # pairs whose odd column also feeds s0[q + 1]
    s0[0] = z
    for q in range(m):
        e = xr[2 * q]
        o = xr[2 * q + 1]
        s1[q] = e
        s2[q] = o
        s0[q + 1] = o
    for q in range(m, nh):               # even W: the last pair (no s0 beyond Wo)
        s1[q] = xr[2 * q]
        s2[q] = xr[2 * q + 1]
    if W % 2:                            # odd W: the last column has no right neighbour
        s1[Wo - 1] = xr[W - 1]
        s2[Wo - 1] = z


@njit(cache=True, inline="always")
def scale_channels(y, g):
    """In place, y (P, C) *= g (C): the SE excitation applied to a band of pixels."""
    P, C = y.shape
    for q in range(P):
        for c in range(C):
            y[q, c] *= g[c]


@njit(cache=True, inline="always")
def se_gate(pool, count, w1, b1, w2, b2, kc, h, g):
    """SE excitation from the channel sums ``pool`` (float64, C) of ``count`` pixels:
    g = hardsigmoid(w2 @ relu(w1 @ mean + b1) + b2); w1 (S, C), w2 (C, S); h (S,) scratch."""
    z, three, six = kc[0], kc[1], kc[2]
    C = g.shape[0]
    for c in range(C):
        g[c] = pool[c] / count                     # the mean, in the data's dtype
    S = h.shape[0]
    gemm(w1, g.reshape(C, 1), h.reshape(S, 1))  # matrix x (C, 1): the one GEMM signature
    for q in range(S):
        h[q] = apply_act(h[q] + b1[q], 1, z, three, six)
    gemm(w2, h.reshape(S, 1), g.reshape(C, 1))
    for c in range(C):
        g[c] = apply_act(g[c] + b2[c], HARDSIGMOID, z, three, six)


@njit(cache=True, inline="always")
def linear_rows(w, xt, b, act, kc, r0, r1, out):
    """Rows [r0, r1) of a linear layer for a batch stored feature-major: out (O, N) =
    act(w (O, I) @ xt (I, N) + b). Splitting O between threads splits the weights, which
    dominate the traffic at batch 1."""
    gemm(w[r0:r1], xt, out[r0:r1])
    z, three, six = kc[0], kc[1], kc[2]
    N = out.shape[1]
    for o in range(r0, r1):
        for n in range(N):
            out[o, n] = apply_act(out[o, n] + b[o], act, z, three, six)
