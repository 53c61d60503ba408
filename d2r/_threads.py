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
_limiter = None
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
    while the other still runs (``threadpoolctl``'s own limiter would)."""
    global _depth, _limiter
    with _lock:
        if _depth == 0:
            _limiter = _blas_controller().limit(limits=1, user_api="blas")
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _limiter.restore_original_limits()
                _limiter = None


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
