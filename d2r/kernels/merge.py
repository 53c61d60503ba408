"""Streaming merge of blocked CSR posting lists: one chunk of words of several segments, word by word."""

import numpy as np
from numba import njit

from d2r.kernels.ivf import BLOCK_BITS


@njit(cache=True)
def merge_postings(seg_offsets, seg_start, seg_blocks, items, payload, item_map, item_base, out_items,
                   out_payload, out_counts, out_blocks):
    """K-way merge of S segments' postings for W consecutive words, dropping removed items.

    Segment s (``seg_blocks[s]`` item blocks, see :func:`d2r.kernels.ivf.scan_bits_items`) has its W·blocks + 1
    offsets at seg_offsets[seg_start[s]:], pointing into ``items``/``payload`` (the S segments' slices of this
    word range, concatenated); items (E,) uint16 ids within their block (or uint32 full ids, one block);
    payload (E, B) any dtype; item_map (M,) int64: new item id, or -1 for a removed item, of every item of the S
    segments (concatenated; segment s starts at item_base[s]). Writes the kept postings word-major, segment order
    within a word (so new item ids stay ascending), into out_items (E,) uint16 (new id − its block's start) /
    out_payload (E, B), and adds the kept count of each (word, new block) to out_counts (W·out_blocks,) int64.
    Returns the number of entries written.
    """
    S = seg_blocks.shape[0]
    W = out_counts.shape[0] // out_blocks
    B = payload.shape[1]
    o = 0
    for w in range(W):
        for s in range(S):
            nb = seg_blocks[s]
            first = seg_start[s] + w * nb
            for b in range(nb):
                base = item_base[s] + (np.int64(b) << BLOCK_BITS)
                for e in range(seg_offsets[first + b], seg_offsets[first + b + 1]):
                    new = item_map[base + np.int64(items[e])]
                    if new >= 0:
                        out_items[o] = new & 0xFFFF
                        for t in range(B):
                            out_payload[o, t] = payload[e, t]
                        out_counts[w * out_blocks + (new >> BLOCK_BITS)] += 1
                        o += 1
    return o
