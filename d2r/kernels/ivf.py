"""Inverted-file scan: σ_{α,τ} scores of one query against every posting of its words."""

import numpy as np
from numba import njit

from d2r.kernels.binary import popcount, popcount64
from d2r.kernels.match import selectivity

BLOCK_BITS = 16  # posting item ids are stored per block of 65,536 items, as item − (block << BLOCK_BITS)
BLOCK = 1 << BLOCK_BITS


@njit(cache=True, nogil=True)
def _lower_bound(items, lo, hi, value, num_items):
    """First e in [lo, hi) with items[e] >= value (items ascending there), else hi. Item ids of a posting list
    spread evenly over [0, num_items), so the search starts at the interpolated position and gallops outwards:
    a few cache lines instead of log2(hi − lo) random reads."""
    if lo >= hi:
        return lo
    g = lo + np.int64((hi - lo) * (value / max(num_items, 1)))
    g = min(max(g, lo), hi - 1)
    if np.int64(items[g]) < value:  # answer in (g, hi]
        a, step = g + 1, 1
        while a + step <= hi and np.int64(items[a + step - 1]) < value:
            a += step
            step *= 2
        b = min(a + step, hi)
    else:  # answer in [lo, g]
        b, step = g, 1
        while b - step >= lo and np.int64(items[b - step]) >= value:
            b -= step
            step *= 2
        a = max(b - step + 1, lo)
    while a < b:  # items[a - 1] < value (or a == lo) and items[b] >= value (or b == hi)
        mid = (a + b) >> 1
        if np.int64(items[mid]) < value:
            a = mid + 1
        else:
            b = mid
    return a


@njit(cache=True, nogil=True)
def scan_bits_items(q_words, q_bits, offsets, items, blocks, bits, dim, alpha, tau, tau_inclusive, weights,
                    scores, first, stop):
    """Accumulate Σ_c w_c σ(1 − 2·h/D) into ``scores[item]`` for every posting of every query word whose item
    lies in [first, stop) (the ASMK* scan; [0, num_items) scans everything).

    q_words (Wq,) int; q_bits (Wq, B) and bits (E, B) packed signatures of the same unsigned dtype (uint64
    words of 128-bit signatures take two popcounts); offsets (K·blocks+1,) int64 blocked CSR offsets: the
    postings of word w with item id in block b (item >> 16 == b) are entries [offsets[w·blocks + b],
    offsets[w·blocks + b + 1]); items (E,) uint16 item − b·65536 (or uint32 full ids when blocks == 1, the
    previous format); weights (K,) float64 or empty; scores (num_items,) float64, updated in place. σ depends
    only on the Hamming distance h, so it is tabulated once. Blocks wholly inside the range are scanned whole,
    and each (word, block) run is ascending in item id (validated when a segment is opened), so two searches
    find the range in the (at most two) blocks it cuts. Threads scanning disjoint item ranges write disjoint
    scores, and every item's sum is taken in the same order as one full scan (bit-identical)."""
    m = scores.shape[0]
    first, stop = max(first, 0), min(stop, m)
    if first >= stop:
        return
    nbits = q_bits.shape[1] * q_bits.itemsize * 8
    table = np.empty(nbits + 1)  # h can exceed dim only through padding bits of a damaged file
    for h in range(nbits + 1):
        table[h] = selectivity(1.0 - 2.0 * min(h, dim) / dim, alpha, tau, tau_inclusive)
    use_w = weights.shape[0] > 0
    chunks = q_bits.shape[1]
    b_first = min(first >> BLOCK_BITS, blocks - 1)
    b_last = min((stop - 1) >> BLOCK_BITS, blocks - 1)
    for qi in range(q_words.shape[0]):
        w = np.int64(q_words[qi])
        wt = weights[w] if use_w else 1.0
        for b in range(b_first, b_last + 1):
            base = np.int64(b) << BLOCK_BITS
            size = m - base if b == blocks - 1 else BLOCK  # ids of the block: [0, size)
            lo, hi = offsets[w * blocks + b], offsets[w * blocks + b + 1]
            if first > base:
                lo = _lower_bound(items, lo, hi, first - base, size)
            if stop < base + size:
                hi = _lower_bound(items, lo, hi, stop - base, size)
            if chunks == 2 and q_bits.itemsize == 8:  # 128-bit signatures as two uint64 words
                _run128(items, bits, lo, hi, np.uint64(q_bits[qi, 0]), np.uint64(q_bits[qi, 1]), table, wt,
                        scores[base:])
            else:
                _run(items, bits, lo, hi, q_bits[qi], table, wt, scores[base:])


@njit(cache=True, nogil=True)
def _run128(items, bits, lo, hi, q0, q1, table, wt, out):
    """The hot loop of :func:`scan_bits_items` for 128-bit signatures (two uint64 words): one (word, block)
    run, ``out`` the scores from the block's first item on (a loop of its own compiles to a tighter body)."""
    for e in range(lo, hi):
        h = popcount64(q0 ^ np.uint64(bits[e, 0])) + popcount64(q1 ^ np.uint64(bits[e, 1]))
        out[items[e]] += table[h] * wt


@njit(cache=True, nogil=True)
def _run(items, bits, lo, hi, q, table, wt, out):
    """As :func:`_run128` for any signature width (``q``: the query word's signature)."""
    for e in range(lo, hi):
        h = 0
        for t in range(q.shape[0]):
            h += popcount(q[t] ^ bits[e, t])
        out[items[e]] += table[h] * wt


@njit(cache=True, nogil=True)
def scan_residuals(q_words, q_desc, offsets, items, blocks, desc, alpha, tau, tau_inclusive, weights, scores):
    """As :func:`scan_bits_items` (all items) with u = ⟨q_c, d_c⟩ on float32 unit vectors (ASMK)."""
    use_w = weights.shape[0] > 0
    D = q_desc.shape[1]
    for qi in range(q_words.shape[0]):
        w = np.int64(q_words[qi])
        wt = weights[w] if use_w else 1.0
        for b in range(blocks):
            base = np.int64(b) << BLOCK_BITS
            for e in range(offsets[w * blocks + b], offsets[w * blocks + b + 1]):
                u = 0.0
                for t in range(D):
                    u += np.float64(q_desc[qi, t]) * np.float64(desc[e, t])
                s = selectivity(u, alpha, tau, tau_inclusive)
                if s != 0.0:
                    scores[base + np.int64(items[e])] += s * wt


@njit(cache=True, nogil=True)
def max_per_image(item_scores, item_image, num_images, empty_value):
    """Image score = max over its items; images without items get ``empty_value``."""
    out = np.full(num_images, -np.inf)
    seen = np.zeros(num_images, np.bool_)
    for i in range(item_scores.shape[0]):
        img = item_image[i]
        seen[img] = True
        if item_scores[i] > out[img]:
            out[img] = item_scores[i]
    for j in range(num_images):
        if not seen[j]:
            out[j] = empty_value
    return out


@njit(cache=True)
def document_frequency(offsets, items, blocks, item_live):
    """Number of live items holding each word: (K,) int64 (offsets/items/blocks as in :func:`scan_bits_items`)."""
    K = (offsets.shape[0] - 1) // blocks
    df = np.zeros(K, np.int64)
    for w in range(K):
        for b in range(blocks):
            base = np.int64(b) << BLOCK_BITS
            for e in range(offsets[w * blocks + b], offsets[w * blocks + b + 1]):
                if item_live[base + np.int64(items[e])]:
                    df[w] += 1
    return df


@njit(cache=True)
def item_weight_sums(offsets, items, blocks, weights, num_items):
    """Σ_{c ∈ W_i} w_c for every item i (the IDF-weighted word count used to normalise): (num_items,)
    float64."""
    out = np.zeros(num_items)
    K = (offsets.shape[0] - 1) // blocks
    for w in range(K):
        for b in range(blocks):
            base = np.int64(b) << BLOCK_BITS
            for e in range(offsets[w * blocks + b], offsets[w * blocks + b + 1]):
                out[base + np.int64(items[e])] += weights[w]
    return out


@njit(cache=True, nogil=True)
def check_postings(offsets, items, blocks, num_items):
    """0 when every item id (b·65536 + items[e]) is < num_items and non-decreasing within each (word, block)
    run (what :func:`scan_bits_items` relies on); 1: an id out of range; 2: a run out of order. offsets: valid
    blocked CSR, (K·blocks+1,) monotone from 0 to E."""
    for r in range(offsets.shape[0] - 1):
        base = np.int64(r % blocks) << BLOCK_BITS
        prev = -1
        for e in range(offsets[r], offsets[r + 1]):
            v = np.int64(items[e])
            if base + v >= num_items:
                return 1
            if v < prev:
                return 2
            prev = v
    return 0


@njit(cache=True, nogil=True)
def normalize_scores(scores, query_sum, item_sums, item_words, empty_value):
    """In place: scores[i] /= sqrt(query_sum · item_sums[i]) where that is > 0, then ``empty_value`` for items
    without words (item_words[i] == 0). item_sums (M,) float64 Σ w_c or (M,) uint32 |W_i|. One pass (M,)."""
    for i in range(scores.shape[0]):
        norm = np.sqrt(query_sum * np.float64(item_sums[i]))
        if norm > 0:
            scores[i] = scores[i] / norm
        if item_words[i] == 0:
            scores[i] = empty_value


@njit(cache=True, nogil=True)
def _sift_down(hs, hi, pos, k):
    """Restore the heap below ``pos``: the root is the worst kept entry (lowest score; among equal scores, the
    highest index)."""
    while True:
        c = 2 * pos + 1
        if c >= k:
            return
        if c + 1 < k and (hs[c + 1] < hs[c] or (hs[c + 1] == hs[c] and hi[c + 1] > hi[c])):
            c += 1
        if hs[c] < hs[pos] or (hs[c] == hs[pos] and hi[c] > hi[pos]):
            hs[c], hs[pos] = hs[pos], hs[c]
            hi[c], hi[pos] = hi[pos], hi[c]
            pos = c
        else:
            return


@njit(cache=True, nogil=True)
def top_k_heap(scores, k):
    """(scores, indices) of the ``k`` highest ``scores`` (1-D float64, no NaN; 1 ≤ k ≤ n), unordered: the set
    of ``argsort(-scores, stable)[:k]`` (equal scores: lower index kept). One pass with a k-heap, O(n log k)
    at worst."""
    hs = scores[:k].copy()
    hi = np.arange(k)
    for p in range(k // 2 - 1, -1, -1):
        _sift_down(hs, hi, p, k)
    for i in range(k, scores.shape[0]):
        if scores[i] > hs[0]:  # a later index must be strictly better to displace an equal score
            hs[0] = scores[i]
            hi[0] = i
            _sift_down(hs, hi, 0, k)
    return hs, hi


@njit(cache=True, nogil=True)
def item_entries(offsets, items, blocks, item):
    """The postings of one item, read back: (words (W,) int64 ascending, entries (W,) int64) for every word
    whose posting list holds ``item`` (global item id of the segment), with the entry index of that posting
    (offsets/items/blocks as in :func:`scan_bits_items`). One binary search per codebook word."""
    K = (offsets.shape[0] - 1) // blocks
    b = np.int64(item) >> BLOCK_BITS if blocks > 1 else np.int64(0)
    value = np.int64(item) - (b << BLOCK_BITS)
    words = np.empty(K, np.int64)
    entries = np.empty(K, np.int64)
    n = 0
    for w in range(K):
        lo = offsets[w * blocks + b]
        hi = offsets[w * blocks + b + 1]
        while lo < hi:
            mid = (lo + hi) >> 1
            if np.int64(items[mid]) < value:
                lo = mid + 1
            else:
                hi = mid
        if lo < offsets[w * blocks + b + 1] and np.int64(items[lo]) == value:
            words[n] = w
            entries[n] = lo
            n += 1
    return words[:n].copy(), entries[:n].copy()
