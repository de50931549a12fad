"""The engine's one object: ``FoldedNet``, a compiled snapshot of a model's eval function.

    plan = Plan(model)          # fold BN, pack weights, one table row per step   (plan.py)
    run.forward                 # fused steps, whole images or row bands over threads (run.py)
    classifier                  # linear + hard-swish + linear on the pooled features

The input and outputs keep torchvision's NCHW layout; only the inside is channels-last.
"""

from __future__ import annotations

import numba
import numpy as np

from ..kernels.threads import single_threaded_blas
from . import run
from .plan import BLOCK, CONV1, F_COUT, F_HO, F_KIND, F_PRE, F_SE, F_WO, Plan


class Workspace:
    """Preallocated buffers for one input size and mode (reused by every call: a fresh
    allocation per call costs page faults, PERFORMANCE_NOTES.md §3)."""

    def __init__(self, sizes, dtype, slots, threads):
        act, dw = sizes["act"], sizes["dw"]
        scratch = sizes["band"] + sizes["acc"] + sizes["sq"] + sizes["chan"]
        self.ws = np.zeros((slots, 2 * act + dw), dtype=dtype)
        self.sc = np.zeros((threads, scratch), dtype=dtype)
        self.pools = np.zeros((2 * threads, sizes["chan"]), dtype=np.float64)  # partial, total

    @property
    def nbytes(self):
        return self.ws.nbytes + self.sc.nbytes + self.pools.nbytes


class FoldedNet:
    """A snapshot of a model's eval-mode function: batch norm folded, every block fused,
    channels-last inside, threads owned by Numba (``npmnv3/engine``'s modules, in order).

    Built by ``fold(model)``; it copies everything it needs, so later changes to the model do
    not reach it (the model builds a new one after ``eval()``, ``load_state_dict()``...). Not
    safe to call from two Python threads at once (it reuses its buffers).
    """

    def __init__(self, model):
        self.plan = Plan(model)
        self.dtype = self.plan.dtype
        self.names = self.plan.names          # the module name of each step's output
        self._ws = {}
        self._call_cache = {}

    # ---------------------------------------------------------------- public functions

    def __call__(self, x):
        """Eval-mode logits (N, num_classes) for x (N, 3, H, W)."""
        return self._run(x, feats=False, trace=False)[1]

    def features(self, x):
        """Eval-mode output of ``features``: (N, C, h, w)."""
        return self._run(x, feats=True, trace=False, logits=False)[0]

    def trace(self, x, mode=None):
        """{step module name: its output (N, C, h, w)} for every step (stem, each block, the
        last conv), and "logits": what the tests compare with torchvision stage by stage.
        ``mode``: "images" or "bands" to force a threading mode (default: ``self.mode(N)``)."""
        if mode not in (None, "images", "bands"):
            raise ValueError(f"mode must be None, 'images' or 'bands', got {mode!r}")
        _, logits, outs = self._run(x, feats=False, trace=True, mode=mode)
        outs["logits"] = logits
        return outs

    # ---------------------------------------------------------------- running

    def mode(self, n: int) -> str:
        """"images" (whole images per thread) when the batch fills the threads, else "bands"."""
        return "images" if n >= numba.get_num_threads() > 1 else "bands"

    def workspace(self, mode, H, W) -> Workspace:
        T = numba.get_num_threads()
        key = (mode, H, W, T)
        if key not in self._ws:
            _, sizes = self.plan.table(H, W, mode)
            self._ws = {k: v for k, v in self._ws.items() if k[0] != mode}   # keep one size
            self._ws[key] = Workspace(sizes, self.dtype, T if mode == "images" else 1, T)
        return self._ws[key]

    def _check(self, x):
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"input must be an array of shape (N, 3, H, W), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def _run(self, x, *, feats, trace, logits=True, mode=None):
        """The batch through ``run.forward``: one call in "images" mode, one per image in
        "bands" mode (the classifier's phases in the last image's call). Returns features
        (N, C, h, w) or None, logits or None, {step name: output} or None."""
        x = self._check(x)
        N, _, H, W = x.shape
        p = self.plan
        mode = mode or self.mode(N)
        T = numba.get_num_threads()
        tab, szs, toffs, calls = self._calls(mode, N, H, W, T, trace, logits)
        ws = self.workspace(mode, H, W)
        last = tab[-1]
        h, w, C = int(last[F_HO]), int(last[F_WO]), int(last[F_COUT])
        tr = np.empty(int(toffs[-1]) if trace else 0, dtype=self.dtype)
        out = np.empty((N, h * w * C if feats else 0), dtype=self.dtype)
        pooled_t = np.empty((C, N), dtype=self.dtype)
        hidden_t = np.empty((p.hidden, N), dtype=self.dtype)
        logits_t = np.empty((p.num_classes, N), dtype=self.dtype)
        ws.pools[...] = 0.0
        task, steps = run.compiled(self.dtype)
        with single_threaded_blas():
            for phases, n0 in calls:
                run.forward(task, steps, phases, T, tab, p.wb, p.kc, p.fc, x, ws.ws, ws.sc,
                            ws.pools, szs, tr, toffs, out, pooled_t, hidden_t, logits_t, n0)
        feats_nchw = out.reshape(N, h, w, C).transpose(0, 3, 1, 2).copy() if feats else None
        outs = None
        if trace:
            outs = {}
            for i, name in enumerate(self.names):
                ho, wo, c = (int(v) for v in tab[i, [F_HO, F_WO, F_COUT]])
                a = tr[toffs[i]:toffs[i] + N * ho * wo * c].reshape(N, ho, wo, c)
                outs[name] = np.ascontiguousarray(a.transpose(0, 3, 1, 2))
        return feats_nchw, (np.ascontiguousarray(logits_t.T) if logits else None), outs

    def _calls(self, mode, N, H, W, T, trace, logits):
        """What one ``_run`` passes to ``run.forward``, made once per (mode, batch, size,
        threads, trace, logits) and kept: the plan table, its buffer sizes, each step's offset
        into the trace (and the trace's size last), and the calls as (phases, image) pairs. In
        "bands" mode each image is one call, and the classifier's phases join the last image's
        call. (Made at every call, this took 55 us of a batch-1 call's Python; now 18 us.)"""
        key = (mode, N, H, W, T, trace, logits)
        if key not in self._call_cache:
            if len(self._call_cache) >= 64:       # a few small arrays each; keep it bounded
                self._call_cache.clear()
            tab, sizes = self.plan.table(H, W, mode)
            szs = np.array([sizes[k] for k in ("act", "dw", "band", "acc", "chan", "sq")])
            step_sizes = tab[:, F_HO] * tab[:, F_WO] * tab[:, F_COUT]
            toffs = np.concatenate([[0], np.cumsum(step_sizes * N)]).astype(np.int64)
            cls = [(run.CLS0, 0), (run.CLS1, 0)] if logits else []
            if mode == "images":
                calls = [(np.array([(run.IMAGES, -1)] + cls, dtype=np.int64), 0)]
            else:
                phases = self.band_phases(tab, trace).tolist()
                calls = [(np.array(phases + (cls if n == N - 1 else []), dtype=np.int64), n)
                         for n in range(N)]
            self._call_cache[key] = (tab, szs, toffs, calls)
        return self._call_cache[key]

    @staticmethod
    def band_phases(tab, trace):
        """The phases of one image split over threads (``run.py``): EXPAND first for F_PRE
        blocks, FRONT for every step, then BACK for SE blocks, GATE (the pool) for the last
        conv, RECORD if tracing."""
        phases = []
        for i, t in enumerate(tab):
            if t[F_PRE]:
                phases.append((run.EXPAND, i))
            phases.append((run.FRONT, i))
            if t[F_KIND] == BLOCK and t[F_SE]:
                phases.append((run.BACK, i))
            elif t[F_KIND] == CONV1:
                phases.append((run.GATE, i))
            if trace:
                phases.append((run.RECORD, i))
        return np.array(phases, dtype=np.int64)
