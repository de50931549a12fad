"""Steps 3 and 4 of the engine: fused step kernels, and the two ways to spread them over threads.

**Fusion** (per step, one image, a range of output rows or pixels). An inverted residual block

    y = project(SE(act(dw(act(expand(x)))))) [+ x]

runs band by band: the expansion rows a band of depthwise output rows reads are computed by one
GEMM into a small scratch (``F_R`` output rows; the rows shared with the next band are kept, not
recomputed), the depthwise conv reads them while they are in cache and writes its output with
bias + activation applied and the SE squeeze summed in the same pass. Without SE the projection
GEMM (+ bias + residual) follows on the same band; with SE it waits for the gate (it needs the
whole image's mean) and runs on the scaled rows afterwards: the excitation is folded into the
projection's input band. Blocks of 28x28 pixels and below (``F_PRE``, plan.py) expand the
whole image in one GEMM instead: their bands would be a few rows, and few-row GEMMs run slowly.
Nothing but the block's output and the depthwise output (and for ``F_PRE`` blocks the
expansion) is ever materialised, and buffers are preallocated (``Workspace``), so no page is
touched twice.

**Threading.** All parallelism is here, in Numba (OpenMP) loops; BLAS runs single-threaded
inside them (``npmnv3.kernels.threads``), so two pools never spin against each other.
Whole images go to threads (batch >= threads: no synchronisation inside the network, each
thread's buffers stay in its cache), or every step of one image is split into row (or pixel)
ranges, one per thread (batch 1), with the SE gate in between and, for the big ``F_PRE``
expansions, the expansion split by pixels before the depthwise conv (row bands of a 7x7 image
overlap: each of two threads expanded 5-6 of its 7 rows).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..kernels.callbacks import Callback, Warmup, compile_ahead
from ..kernels.nhwc import (
    conv_rows,
    depthwise_rows,
    linear_rows,
    pointwise,
    scale_channels,
    se_gate,
)
from ..kernels.tasks import launch, parallel_tasks
from .plan import (
    BLOCK,
    CONV1,
    F_ACT,
    F_B1,
    F_B2,
    F_BD,
    F_BE,
    F_BP,
    F_CEXP,
    F_CIN,
    F_COUT,
    F_D,
    F_EXPAND,
    F_H,
    F_HO,
    F_K,
    F_KIND,
    F_P,
    F_PRE,
    F_R,
    F_RES,
    F_S,
    F_SE,
    F_SQ,
    F_W,
    F_W1,
    F_W2,
    F_WD,
    F_WE,
    F_WO,
    F_WP,
    NF,
    STEM,
)

# A bare ``0`` argument is typed Literal[int](0) and compiles a second copy of the kernel; every
# call passes the activation code as an int64 so each kernel has one signature.
NO_ACT = np.int64(0)


@njit(cache=True, inline="always")
def mat(buf, off, r, c):
    """The (r, c) C-order matrix stored at ``buf[off:]``."""
    return buf[off:off + r * c].reshape(r, c)


@njit(cache=True, inline="always")
def geometry(t):
    return (t[F_H], t[F_W], t[F_HO], t[F_WO], t[F_K], t[F_S], t[F_P], t[F_D])


@njit(cache=True)
def stem_rows(t, wb, xn, y, acc, kc, o0, o1):
    """Stem conv of image xn (3, H, W) NCHW into y (Ho*Wo*K) NHWC, output rows [o0, o1)."""
    K = t[F_COUT]
    w = mat(wb, t[F_WE], xn.shape[0] * t[F_K] * t[F_K], K)
    Wo = t[F_WO]
    conv_rows(xn, w, wb[t[F_BE]:t[F_BE] + K], geometry(t), t[F_ACT], kc, o0, o1, acc,
              y[:t[F_HO] * Wo * K].reshape(t[F_HO], Wo, K))


@njit(cache=True)
def block_front(t, wb, x, y, D, E, acc, pool, kc, o0, o1):
    """Expand + depthwise (+ SE squeeze into ``pool``) for output rows [o0, o1); without SE
    the projection too, band by band, into y. x, y, D, E: flat per-image buffers. With
    ``F_PRE`` E already holds the whole image's expansion (``conv1_pixels``)."""
    H, W, Wo = t[F_H], t[F_W], t[F_WO]
    k, s, p, d = t[F_K], t[F_S], t[F_P], t[F_D]
    cin, ce, cout, act = t[F_CIN], t[F_CEXP], t[F_COUT], t[F_ACT]
    geom = geometry(t)
    wd = mat(wb, t[F_WD], k * k, ce)
    bd = wb[t[F_BD]:t[F_BD] + ce]
    we = mat(wb, t[F_WE], cin, ce)
    be = wb[t[F_BE]:t[F_BE] + ce]
    wp = mat(wb, t[F_WP], ce, cout)
    bp = wb[t[F_BP]:t[F_BP] + cout]
    X = x[:H * W * cin].reshape(H * W, cin)
    fuse = t[F_SE] == 0
    D3 = D[:t[F_HO] * Wo * ce].reshape(t[F_HO], Wo, ce)
    have_lo, have_hi = 0, 0                       # input rows held in E: [have_lo, have_hi)
    banded = t[F_EXPAND] and not t[F_PRE]
    for b0 in range(o0, o1, t[F_R]):
        b1 = min(o1, b0 + t[F_R])
        src, lo = E if t[F_PRE] else x, 0
        if banded:
            lo = max(0, b0 * s - p)
            hi = min(H, (b1 - 1) * s - p + (k - 1) * d + 1)
            start = lo
            if have_lo <= lo < have_hi:           # keep the rows the last band expanded
                n = (have_hi - lo) * W * ce
                shift = (lo - have_lo) * W * ce
                for q in range(n):
                    E[q] = E[shift + q]
                start = have_hi
            if hi > start:
                Eb = E[(start - lo) * W * ce:(hi - lo) * W * ce].reshape((hi - start) * W, ce)
                pointwise(X[start * W:hi * W], we, be, act, kc, Eb, Eb[:0])
            have_lo, have_hi = lo, hi
            src = E
        rows = have_hi - lo if banded else H
        depthwise_rows(src[:rows * W * ce].reshape(rows, W, ce), lo, wd, bd, geom, act, kc, b0,
                       b1, acc[:Wo * ce].reshape(Wo, ce), D3, pool)
        if fuse:
            Db = D[b0 * Wo * ce:b1 * Wo * ce].reshape((b1 - b0) * Wo, ce)
            Y = y[b0 * Wo * cout:b1 * Wo * cout].reshape((b1 - b0) * Wo, cout)
            res = X[b0 * Wo:b1 * Wo] if t[F_RES] else X[:0]
            pointwise(Db, wp, bp, NO_ACT, kc, Y, res)


@njit(cache=True)
def block_gate(t, wb, pool, kc, h, g):
    """The SE gate g (C,) of a block from its depthwise output's channel sums."""
    ce, sq = t[F_CEXP], t[F_SQ]
    se_gate(pool[:ce], t[F_HO] * t[F_WO], mat(wb, t[F_W1], sq, ce), wb[t[F_B1]:t[F_B1] + sq],
            mat(wb, t[F_W2], ce, sq), wb[t[F_B2]:t[F_B2] + ce], kc, h[:sq], g[:ce])


@njit(cache=True)
def block_back(t, wb, x, y, D, g, kc, q0, q1):
    """SE blocks, pixels [q0, q1): y = (D * g) @ Wp + bp [+ x]."""
    ce, cout = t[F_CEXP], t[F_COUT]
    Db = D[q0 * ce:q1 * ce].reshape(q1 - q0, ce)
    scale_channels(Db, g[:ce])
    Y = y[q0 * cout:q1 * cout].reshape(q1 - q0, cout)
    X = x[q0 * cout:q1 * cout].reshape(q1 - q0, cout)
    pointwise(Db, mat(wb, t[F_WP], ce, cout), wb[t[F_BP]:t[F_BP] + cout], NO_ACT, kc, Y,
              X if t[F_RES] else X[:0])


@njit(cache=True)
def conv1_pixels(t, wb, x, y, pool, kc, q0, q1):
    """A step's 1x1 conv + act for pixels [q0, q1): the last conv (its channel sums added to
    ``pool``), or a block's expansion (``F_PRE`` blocks: y is the expansion buffer E)."""
    block = t[F_KIND] == BLOCK
    cin, cout = t[F_CIN], t[F_CEXP] if block else t[F_COUT]
    w_off, b_off = (t[F_WE], t[F_BE]) if block else (t[F_WP], t[F_BP])
    Y = y[q0 * cout:q1 * cout].reshape(q1 - q0, cout)
    pointwise(x[q0 * cin:q1 * cin].reshape(q1 - q0, cin), mat(wb, w_off, cin, cout),
              wb[b_off:b_off + cout], t[F_ACT], kc, Y, Y[:0])
    if not block:
        for q in range(q1 - q0):
            for c in range(cout):
                pool[c] += Y[q, c]


@njit(cache=True)
def classifier_rows(layer, wb, fc, kc, xt, out, r0, r1):
    """Output rows [r0, r1) of classifier layer ``layer`` (0: linear + hard-swish, 1: linear)
    for the batch stored feature-major: xt (I, N) -> out (O, N); weights at ``fc``'s offsets."""
    O, I = out.shape[0], xt.shape[0]
    w_off, b_off = fc[2 * layer], fc[2 * layer + 1]
    linear_rows(mat(wb, w_off, O, I), xt, wb[b_off:b_off + O], 2 if layer == 0 else 0, kc, r0,
                r1, out)


# ----------------------------------------------------------------------------- drivers
#
# One driver for the whole engine (``forward``): a list of phases, each run by T tasks (one
# per thread, started on Numba's threading layer by ``tasks.parallel_tasks``; a phase ends
# before the next starts). Phases: IMAGES (task c runs whole images), or per step EXPAND (``F_PRE``
# blocks: pixels [cn/T, (c+1)n/T) of the expansion, into thread 0's E, which every task then
# reads), FRONT (rows / pixels of stem, [expand +] depthwise [+ projection], last conv), BACK
# (SE blocks: each task sums the tasks' squeeze partials, computes the gate -- a few us, done
# twice rather than waiting for one thread -- and projects its pixels), GATE (task 0: the last
# conv's average pool), RECORD (task 0 copies a step's output for ``trace``), then CLS0 / CLS1
# (output rows of the two classifier layers).

IMAGES, EXPAND, FRONT, GATE, BACK, RECORD, CLS0, CLS1 = range(8)


@njit(cache=True)
def fill(a, v):
    for i in range(a.shape[0]):
        a[i] = v


@njit(cache=True)
def copy(dst, src, n):
    for i in range(n):
        dst[i] = src[i]


def task(c, c_end, steps, ph, i, T, tab, wb, kc, fc, xs, ws, sc, pools, sizes, trace, toffs,
         feats, pooled_t, hidden_t, logits_t, n0):
    """Task c of T of phase ``ph`` (of step i; image n0 in band phases); ``c_end`` is c + 1
    (``tasks.parallel_tasks`` calls one task at a time). Every kernel is called from one place
    only, for the whole-image (IMAGES) and the band phases alike. ``steps``: the addresses of
    the step functions above, compiled as C callbacks (``compiled``)."""
    stem_rows, block_front = step_function(steps[0], 0, wb), step_function(steps[1], 1, wb)
    block_gate, block_back = step_function(steps[2], 2, wb), step_function(steps[3], 3, wb)
    conv1_pixels, classifier_rows = step_function(steps[4], 4, wb), step_function(steps[5], 5, wb)
    act, dw, band, nacc, chan, sq = sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5]
    s = sc[c]
    E, acc, h = s[:band], s[band:band + nacc], s[band + nacc:band + nacc + sq]
    g = s[band + nacc + sq:band + nacc + sq + chan]
    E0 = sc[0, :band]                       # EXPAND phases: the expansion all tasks read
    if ph == IMAGES:
        wsl = ws[c]
        n_lo, n_hi, share = c * xs.shape[0] // T, (c + 1) * xs.shape[0] // T, 1
        j_lo, j_hi = (0, tab.shape[0]) if i < 0 else (i, i + 1)     # all steps, or step i
    elif ph <= RECORD:
        wsl = ws[0]
        n_lo, n_hi, j_lo, j_hi, share = n0, n0 + 1, i, i + 1, T
    else:
        xt = pooled_t if ph == CLS0 else hidden_t
        out = hidden_t if ph == CLS0 else logits_t
        O = out.shape[0]
        classifier_rows(ph - CLS0, wb, fc, kc, xt, out, c * O // T, (c + 1) * O // T)
        return
    a0, a1, D = wsl[:act], wsl[act:2 * act], wsl[2 * act:2 * act + dw]
    pool = pools[c]
    for n in range(n_lo, n_hi):
        for j in range(j_lo, j_hi):
            t = tab[j]
            x, y = (a1, a0) if j % 2 == 0 else (a0, a1)
            kind, se = t[F_KIND], t[F_SE]
            rows = t[F_HO] * t[F_WO] if kind == CONV1 else t[F_HO]
            pixels = t[F_HO] * t[F_WO]
            size = pixels * t[F_COUT]
            whole = ph == IMAGES
            part = np.int64(0) if whole else np.int64(c)   # this task's share of the step
            Et = E0 if t[F_PRE] and not whole else E    # where an F_PRE block's expansion is
            if ph == EXPAND or whole and kind == BLOCK and t[F_PRE]:
                hw = t[F_H] * t[F_W]                    # (its pixels split over the tasks)
                conv1_pixels(t, wb, x, Et, pool, kc, part * hw // share,
                             (part + 1) * hw // share)
            if whole or ph == FRONT:
                lo, hi = part * rows // share, (part + 1) * rows // share
                fill(pool, 0.0)                     # this task's SE / pool partial sums
                if kind == STEM:
                    stem_rows(t, wb, xs[n], y, acc, kc, lo, hi)
                elif kind == BLOCK:
                    block_front(t, wb, x, y, D, Et, acc, pool if se else pool[:0], kc, lo, hi)
                else:
                    conv1_pixels(t, wb, x, y, pool, kc, lo, hi)
            if whole or (ph == GATE and c == 0):    # the last conv's average pool
                if not whole:
                    for k in range(1, T):
                        for q in range(pools.shape[1]):
                            pools[0, q] += pools[k, q]
                if kind == BLOCK and se:
                    block_gate(t, wb, pool, kc, h, g)
                elif kind == CONV1:
                    copy(feats[n], y, feats.shape[1])
                    for q in range(t[F_COUT]):
                        pooled_t[q, n] = pool[q] / pixels
            if (whole or ph == BACK) and kind == BLOCK and se:
                if not whole:                       # every task sums the partials itself and
                    tot = pools[T + c]              # computes the gate: no serial phase
                    fill(tot, 0.0)
                    for k in range(T):
                        for q in range(pools.shape[1]):
                            tot[q] += pools[k, q]
                    block_gate(t, wb, tot, kc, h, g)
                block_back(t, wb, x, y, D, g, kc, part * pixels // share,
                           (part + 1) * pixels // share)
            if trace.shape[0] and (whole or ph == RECORD and c == 0):
                copy(trace[toffs[j] + n * size:], y, size)


# ----------------------------------------------------------------------------- compilation
#
# Numba links a callee's machine code into every caller that calls it directly, and optimises
# and emits the linked module again at each level: the kernels, ``block_front``..., ``task``,
# the parallel loop's body and ``forward`` each held a copy of the whole engine, and an empty
# cache spent ~28 s there (17 s once ``task`` alone was a callback, ~12.5 s later). So the
# levels are compiled once each, as C callbacks (``cfunc``, one per dtype) called through
# pointers: the step functions (``stem_rows``, ``block_front``, ``block_gate``, ``block_back``,
# ``conv1_pixels``, ``classifier_rows``; each links only its own kernels), ``task`` (which
# receives the steps' addresses as arguments, so it holds no copy of them), and ``forward``
# (a plain dispatcher, since Python calls it with arrays; it receives ``task``'s address and
# hands it to the threading layer: no ``prange``, whose gufunc took 1.3-1.5 s to compile for
# this one loop, 0.4-0.7 s now). Addresses travel as
# arguments (the steps' in an int64 array, ``step_function`` turns one back into a callable),
# never as globals, so every level stays cacheable, and ``forward`` has one
# signature per dtype. A call through a pointer costs nanoseconds; there are a few per step.
# Fixed signatures also let a helper process compile about half of the callbacks on an empty
# cache (``compiled``; benchmarks/README.md, "Task kernels and the compile helper").


def _types(dtype):
    """Numba types of the engine's arrays for ``dtype`` (a NumPy or Numba float type; every
    array C-contiguous)."""
    f = dtype if isinstance(dtype, types.Float) else types.float32 if np.dtype(
        dtype) == np.float32 else types.float64
    return SimpleNamespace(i=types.int64, ints=types.int64[::1], table=types.int64[:, ::1],
                           vec=f[::1], mat2=f[:, ::1], img=f[:, :, ::1], imgs=f[:, :, :, ::1],
                           pool=types.float64[::1], pools=types.float64[:, ::1])


def step_signatures(dtype):
    """The C signatures of the six step functions, in ``task``'s argument order."""
    a = _types(dtype)
    row, i, v, pool = a.ints, a.i, a.vec, a.pool
    return (types.void(row, v, a.img, v, v, v, i, i),                       # stem_rows
            types.void(row, v, v, v, v, v, v, pool, v, i, i),               # block_front
            types.void(row, v, pool, v, v, v),                              # block_gate
            types.void(row, v, v, v, v, v, v, i, i),                        # block_back
            types.void(row, v, v, v, pool, v, i, i),                        # conv1_pixels
            types.void(i, v, row, v, a.mat2, a.mat2, i, i))                 # classifier_rows


def task_signature(dtype):
    """The C signature of ``task`` for arrays of ``dtype``."""
    a = _types(dtype)
    i, v, m = a.i, a.vec, a.mat2
    return types.void(i, i, a.ints, i, i, i, a.table, v, v, a.ints, a.imgs, m, m, a.pools,
                      a.ints, v, a.ints, m, m, m, m, i)


STEPS = (stem_rows, block_front, block_gate, block_back, conv1_pixels, classifier_rows)
_COMPILED = {}


@intrinsic
def step_function(typingctx, addr, k, wb):
    """``STEPS[k]`` (k a constant) for arrays of wb's dtype, as a function value calling the
    C callback at address ``addr`` (int64). Addresses travel in an int64 array: a tuple of
    cfunc objects would cost ~0.2 ms of Python-side typing on every ``forward`` call."""
    if not isinstance(k, types.IntegerLiteral):
        return None
    fty = types.FunctionType(step_signatures(wb.dtype)[k.literal_value])

    def codegen(context, builder, sig, args):
        fn = cgutils.create_struct_proxy(fty)(context, builder)    # the other fields: null
        fn.c_addr = builder.inttoptr(args[0], cgutils.voidptr_t)
        return fn._getvalue()
    return fty(addr, k, wb), codegen


# The steps and ``task`` as ``Callback`` objects (kernels/callbacks.py): one C callback per
# dtype, made on first use, and ``compile_ahead`` can hand some to a helper process.
_STEP_CALLBACKS = tuple(Callback(f.py_func, lambda dt, k=k: step_signatures(dt)[k])
                        for k, f in enumerate(STEPS))
_TASK = Callback(task, task_signature)


def _forward_ahead(dtype):
    """Call ``forward`` on zero phases with arrays of the engine's types (nothing runs)."""
    f, i8 = np.dtype(dtype), np.int64
    v, m = np.zeros(0, f), np.zeros((0, 0), f)
    launch()
    forward(0, np.zeros(len(STEPS), i8), np.zeros((0, 2), i8), 1, np.zeros((0, NF), i8), v, v,
            np.zeros(4, i8), np.zeros((0, 3, 1, 1), f), m, m, np.zeros((0, 0)), np.zeros(6, i8),
            v, np.zeros(0, i8), m, m, m, m, 0)


def compiled(dtype):
    """``(task address, step addresses)`` for ``dtype`` (float32 or float64), C callbacks made
    on first use: the first two arguments of ``forward``. On an empty Numba cache a helper
    process compiles them from the end of the list (the block steps, about half of the work,
    then ``forward`` itself, on zero phases) while this one compiles from its start; each is
    loaded from the cache if the helper made it."""
    key = np.dtype(dtype)
    if key not in _COMPILED:
        launch()
        compile_ahead(_ORDER, key)
        for cb in _ORDER:
            cb.compiled(key)
        addrs = [cb.address(key) for cb in _STEP_CALLBACKS]
        _COMPILED[key] = (_TASK.address(key), np.array(addrs, dtype=np.int64))
    return _COMPILED[key]


@njit(cache=True, nogil=True)
def forward(task, steps, phases, T, tab, wb, kc, fc, xs, ws, sc, pools, sizes, trace, toffs,
            feats, pooled_t, hidden_t, logits_t, n0):
    """Run ``phases`` (M, 2): (phase, step) rows, each as T parallel tasks of ``task`` (the
    address of its C callback) with the step functions' addresses ``steps`` (both from
    ``compiled(dtype)``); each phase ends before the next starts."""
    for m in range(phases.shape[0]):
        ph, i = phases[m, 0], phases[m, 1]
        parallel_tasks(task, T, (steps, ph, i, T, tab, wb, kc, fc, xs, ws, sc, pools, sizes,
                                 trace, toffs, feats, pooled_t, hidden_t, logits_t, n0))


# What ``compiled`` makes, in the order it needs them; a helper takes them from the end: the
# block steps (about half of the work), then ``forward`` (argument 5, wb, has the dtype).
_FORWARD = Warmup(forward, _forward_ahead, 5)
_ORDER = (_TASK, *(_STEP_CALLBACKS[k] for k in (0, 2, 4)), _FORWARD,
          *(_STEP_CALLBACKS[k] for k in (5, 1, 3)))
