"""The one thread policy: BLAS and numba thread pools never compete with d2r's own threads.

d2r parallelises in two ways: Python threads over independent work (candidates verified, row blocks of an
assignment, queries of a batch), and numba ``prange`` loops (RANSAC). Either way every thread runs BLAS on
one thread: a multi-threaded GEMM inside each Python thread oversubscribes the cores, and on a loaded machine
the idle BLAS threads spin (measured 4-6× slower verification on a busy 2-core box, and small searches losing
to single-threaded peers, issue 23 item 13). One level of parallelism: a query thread of a batch runs numba
(and so its verification) on one thread. Small work runs on the calling thread with no pool: an assignment
below ``_PARALLEL_MIN_ROWS`` descriptors of ``d2r.codebook.codebook`` (cut-over measured in
``benchmarks/results/core.md``), one candidate, a batch of one query.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import numba
from threadpoolctl import ThreadpoolController

_lock = threading.Lock()
_depth = 0  # active one_blas_thread() blocks, over all threads
_limiters: list = []  # threadpoolctl limiters of the active blocks, oldest first
_limited_by = None  # the controller the newest limiter was made from
_controller = None
_modules_seen = 0


def _blas_controller():
    """The BLAS libraries loaded, inspected again (milliseconds) whenever modules were imported since: a
    library loaded later (scipy's or scikit-learn's OpenBLAS) was never limited, and ran its own threads."""
    global _controller, _modules_seen
    if _controller is None or len(sys.modules) != _modules_seen:
        _modules_seen = len(sys.modules)
        _controller = ThreadpoolController()
    return _controller


@contextlib.contextmanager
def one_blas_thread():
    """BLAS held at one thread process-wide inside the block, restored when the LAST concurrent block exits.

    Reference-counted over threads: two overlapping blocks on different threads do not restore the limit
    while the other still runs (``threadpoolctl``'s own limiter would). A block entered while others run also
    limits the BLAS libraries loaded since they began (a long-lived block, a server's say, must not leave a
    library loaded later at its own thread count); the limits are restored in reverse order at the end."""
    global _depth, _limited_by
    with _lock:
        controller = _blas_controller()
        if controller is not _limited_by:
            _limiters.append(controller.limit(limits=1, user_api="blas"))
            _limited_by = controller
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for limiter in reversed(_limiters):
                    limiter.restore_original_limits()
                _limiters.clear()
                _limited_by = None


@contextlib.contextmanager
def openmp_blas_one_thread():
    """The BLAS libraries threaded by OpenMP (faiss's OpenBLAS) at one thread on THIS thread, restored at the
    end: their thread count is a per-thread OpenMP setting, so :func:`one_blas_thread` set it only on the
    thread that entered the block, and a batch's query threads ran them at their own count."""
    with _lock:
        libs = [c for c in _blas_controller().lib_controllers
                if c.user_api == "blas" and getattr(c, "threading_layer", None) == "openmp"]
    previous = [c.get_num_threads() for c in libs]
    for c in libs:
        c.set_num_threads(1)
    try:
        yield
    finally:
        for c, n in zip(libs, previous):
            c.set_num_threads(n)


@contextlib.contextmanager
def numba_threads(n: int):
    """numba's parallel loops on this thread use ``n`` threads (at most ``NUMBA_NUM_THREADS``, at least 1)
    inside the block; the previous count is restored in ``finally`` (numba's count is per calling thread)."""
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def current_threads() -> int:
    """numba's thread count for the calling thread (1 inside a ``numba_threads(1)`` block)."""
    return int(numba.get_num_threads())
