"""Streaming merge of CSR posting lists: one chunk of words of several segments, word by word."""

from numba import njit


@njit(cache=True)
def merge_postings(seg_offsets, items, payload, item_map, item_base, out_items, out_payload, out_counts):
    """K-way merge of S segments' postings for W consecutive words, dropping removed items.

    seg_offsets (S, W+1) int64: where each word's postings of segment s start in ``items``/``payload`` (the S
    segments' slices of this word range, concatenated); items (E,) uint32 local item ids of their segment;
    payload (E, B) any dtype; item_map (M,) int64: new item id, or -1 for a removed item, of every item of the S
    segments (concatenated; segment s starts at item_base[s]). Writes the kept postings word-major, segment order
    within a word (so new item ids stay ascending), into out_items (E,) uint32 / out_payload (E, B), and the kept
    count of each word into out_counts (W,) int64. Returns the number of entries written.
    """
    S = seg_offsets.shape[0]
    W = seg_offsets.shape[1] - 1
    B = payload.shape[1]
    o = 0
    for w in range(W):
        start = o
        for s in range(S):
            base = item_base[s]
            for e in range(seg_offsets[s, w], seg_offsets[s, w + 1]):
                new = item_map[base + items[e]]
                if new >= 0:
                    out_items[o] = new
                    for b in range(B):
                        out_payload[o, b] = payload[e, b]
                    o += 1
        out_counts[w] = o - start
    return o
