"""Each numba kernel against its plain-numpy twin on random inputs."""

import numpy as np
import pytest

from d2r.kernels import aggregate as ka
from d2r.kernels import assign as kas
from d2r.kernels import binary as kb
from d2r.kernels import match as km
from tests import reference as ref


@pytest.mark.parametrize("seed", range(4))
def test_smallest_per_row_matches_stable_argsort(seed):
    rng = np.random.default_rng(seed)
    n, k = 50, int(rng.integers(1, 300))
    # Quantised values force many exact ties; the kernel must keep the lower index first.
    dots = rng.integers(-4, 4, size=(n, k)).astype(np.float32)
    norms = rng.integers(0, 3, size=k).astype(np.float32)
    c = min(k, int(rng.integers(1, 6)))
    got = ref.smallest_per_row(dots, norms, c)
    want = np.argsort(norms[None, :] - 2 * dots, axis=1, kind="stable")[:, :c]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(4))
def test_refine_exact_orders_by_distance_then_index(seed):
    rng = np.random.default_rng(seed)
    cents = rng.integers(-2, 3, size=(20, 3)).astype(np.float32)  # duplicates → exact ties
    x = rng.integers(-2, 3, size=(40, 3)).astype(np.float32)
    cand = np.stack([rng.permutation(20)[:6] for _ in range(40)]).astype(np.int64)
    got = ref.refine_exact(x, cents, cand, 3)
    for i in range(40):
        d = ((x[i].astype(np.float64) - cents[cand[i]].astype(np.float64)) ** 2).sum(1)
        order = np.lexsort((cand[i], d))[:3]
        np.testing.assert_array_equal(got[i], cand[i][order])


@pytest.mark.parametrize("seed", range(4))
def test_update_shortlist_in_blocks_equals_one_stable_sort(seed):
    rng = np.random.default_rng(seed)
    n, k = 30, int(rng.integers(5, 400))
    dots = rng.integers(-4, 4, size=(n, k)).astype(np.float32)  # many exact ties, also across blocks
    norms = rng.integers(0, 3, size=k).astype(np.float32)
    c = min(k, int(rng.integers(1, 8)))
    best_d = np.full((n, c), np.inf, np.float32)
    best_i = np.full((n, c), -1, np.int64)
    edges = np.unique(np.concatenate([[0, k], rng.integers(0, k, size=4)]))
    for a, b in zip(edges[:-1], edges[1:]):
        kas.update_shortlist(np.ascontiguousarray(dots[:, a:b]), norms[a:b], a, best_d, best_i)
    values = norms[None, :] - 2 * dots
    want = np.argsort(values, axis=1, kind="stable")[:, :c]
    np.testing.assert_array_equal(best_i, want)
    np.testing.assert_array_equal(best_d, np.take_along_axis(values, want, 1))


@pytest.mark.parametrize("seed", range(3))
def test_refine_or_scan_full_rows_scan_every_word(seed):
    rng = np.random.default_rng(seed)
    cents = rng.integers(-2, 3, size=(25, 3)).astype(np.float32)  # duplicates → exact ties
    x = rng.integers(-2, 3, size=(40, 3)).astype(np.float32)
    cand = np.stack([rng.permutation(25)[:5] for _ in range(40)]).astype(np.int64)
    full = rng.random(40) < 0.5
    got = kas.refine_or_scan(x, cents, cand, full, 3)
    for i in range(40):
        pool = np.arange(25) if full[i] else cand[i]
        d = ((x[i].astype(np.float64) - cents[pool].astype(np.float64)) ** 2).sum(1)
        np.testing.assert_array_equal(got[i], pool[np.lexsort((pool, d))[:3]])


def _select_twin(values, edges, m, margin):
    """Plain numpy: witnesses (m smallest CHUNK-word minima per block) and the candidates each block keeps."""
    n = values.shape[0]
    wit = np.full((n, m), np.inf, np.float32)
    keep = np.zeros(values.shape, bool)
    for a, b in zip(edges[:-1], edges[1:]):
        blk = values[:, a:b]
        mins = [blk[:, s:s + kas.CHUNK].min(1) for s in range(0, b - a, kas.CHUNK)]
        wit = np.sort(np.concatenate([wit, np.stack(mins, 1)], 1), 1)[:, :m]
        t = wit[:, m - 1] + margin
        keep[:, a:b] = blk <= t[:, None]
    return wit, keep


@pytest.mark.parametrize("seed", range(6))
def test_select_candidates_matches_numpy_twin(seed):
    rng = np.random.default_rng(seed)
    n, k, m = 40, int(rng.integers(300, 900)), int(rng.integers(1, 4))
    dots = rng.integers(-6, 6, size=(n, k)).astype(np.float32)  # exact ties, also across blocks
    norms = rng.integers(0, 4, size=k).astype(np.float32)
    margin = rng.choice([0.0, 1.0, 2.5], size=n).astype(np.float32)
    edges = np.unique(np.concatenate([[0, k], rng.integers(2 * m * kas.CHUNK, k, size=3)]))
    wit = np.full((n, m), np.inf, np.float32)
    cap = k  # never overflows
    cand_d, cand_i = np.empty((n, cap), np.float32), np.empty((n, cap), np.int64)
    cnt = np.zeros(n, np.int64)
    for a, b in zip(edges[:-1], edges[1:]):
        kas.select_candidates(np.ascontiguousarray(dots[:, a:b]), norms[a:b], a, margin, wit, cand_d, cand_i,
                              cnt)
    values = norms[None, :] - 2 * dots
    want_wit, keep = _select_twin(values, edges, m, margin)
    np.testing.assert_array_equal(wit, want_wit)
    for i in range(n):
        np.testing.assert_array_equal(np.sort(cand_i[i, :cnt[i]]), np.flatnonzero(keep[i]))
        np.testing.assert_array_equal(cand_d[i, :cnt[i]], values[i, cand_i[i, :cnt[i]]])
    # A small capacity: a row overflows (cnt = −1) or still holds every word within the final threshold.
    small = max(int(np.median(cnt)), 1)  # about half the rows overflow
    cd, ci, c = np.empty((n, small), np.float32), np.empty((n, small), np.int64), np.zeros(n, np.int64)
    w2 = np.full((n, m), np.inf, np.float32)
    for a, b in zip(edges[:-1], edges[1:]):
        kas.select_candidates(np.ascontiguousarray(dots[:, a:b]), norms[a:b], a, margin, w2, cd, ci, c)
    final = values <= (want_wit[:, m - 1] + margin)[:, None]
    assert (c == -1).any() and (c >= 0).any()
    for i in np.flatnonzero(c >= 0):
        assert set(np.flatnonzero(final[i])) <= set(ci[i, :c[i]])


@pytest.mark.parametrize("seed", range(6))
def test_finish_candidates_equals_float64_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k, d, m = 60, int(rng.integers(300, 700)), 3, int(rng.integers(1, 5))
    cents = rng.integers(-3, 4, size=(k, d)).astype(np.float32)  # small integers: exact float32, exact ties
    x = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    dots, norms = x @ cents.T, (cents * cents).sum(1)
    margin = np.full(n, 0.5, np.float32)  # exact arithmetic: any margin ≥ 0 is a valid rounding bound
    wit = np.full((n, m), np.inf, np.float32)
    cand_d, cand_i = np.empty((n, 16), np.float32), np.empty((n, 16), np.int64)
    cnt = np.zeros(n, np.int64)
    kas.select_candidates(dots, norms, 0, margin, wit, cand_d, cand_i, cnt)
    cnt[rng.random(n) < 0.2] = -1  # rows scanned over every word
    out = np.empty((n, m), np.int64)
    kas.finish_candidates(x, cents, margin, cand_d, cand_i, cnt, out)
    np.testing.assert_array_equal(out, ref.assign(x, cents, m))


@pytest.mark.parametrize("seed", range(3))
def test_group_residuals(seed):
    rng = np.random.default_rng(seed)
    n, k, d, m = 300, 17, 5, 2
    x = rng.standard_normal((n, d)).astype(np.float32)
    cents = rng.standard_normal((k, d)).astype(np.float32)
    assignments = rng.integers(0, k, size=(n, m)).astype(np.int64)
    region = np.sort(rng.integers(0, 4, size=n)).astype(np.int64)
    keys, sums = ka.group_residuals(x, cents, assignments, region, k)
    want = {}
    for i in range(n):
        for w in assignments[i]:
            key = region[i] * k + w
            want[key] = want.get(key, 0) + (x[i].astype(np.float64) - cents[w])
    np.testing.assert_array_equal(keys, sorted(want))
    np.testing.assert_allclose(sums, np.array([want[key] for key in sorted(want)]), atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_combine_regions(seed):
    rng = np.random.default_rng(seed)
    k, d = 11, 4
    keys = np.unique(rng.integers(0, 5 * k, size=30)).astype(np.int64)
    sums = rng.standard_normal((keys.size, d))
    words, out = ka.combine_regions(keys, sums, k, 1e-12)
    dense = np.zeros((k, d))
    for r in np.unique(keys // k):
        sel = keys // k == r
        block = np.zeros((k, d))
        block[keys[sel] % k] = sums[sel]
        dense += ref.l2(block)
    np.testing.assert_array_equal(words, np.unique(keys % k))
    np.testing.assert_allclose(out, dense[words], atol=1e-12)


def test_normalize_words_threshold_and_scale():
    sums = np.array([[3.0, 4.0], [1e-7, 0.0], [0.0, -2.0], [4e-6, 0.0]])
    keep, unit = ka.normalize_words(sums, 0.25, 1e-6)  # scaled norms 1.25, 2.5e-8, 0.5, 1e-6 (not > 1e-6)
    np.testing.assert_array_equal(keep, [True, False, True, False])
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, -1.0]], atol=1e-7)


@pytest.mark.parametrize("d", [2, 8, 13, 128])
def test_pack_bits_matches_numpy_packbits(d):
    rng = np.random.default_rng(d)
    unit = rng.standard_normal((40, d)).astype(np.float32)
    unit[0, :] = 0.0  # zero is not > 0
    np.testing.assert_array_equal(kb.pack_bits(unit), np.packbits(unit > 0, axis=1))
    np.testing.assert_array_equal(kb.pack_bits(unit.astype(np.float64)), np.packbits(unit > 0, axis=1))


def test_hamming_matches_unpackbits():
    rng = np.random.default_rng(1)
    for _ in range(50):
        a, b = rng.integers(0, 256, size=(2, 16)).astype(np.uint8)
        assert kb.hamming(a, b) == ref.hamming(a, b)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("inclusive", [False, True])
def test_match_kernels_against_python(seed, inclusive):
    rng = np.random.default_rng(seed)
    d, k = 8, 30
    wa = np.sort(rng.choice(k, 12, replace=False)).astype(np.int64)
    wb = np.sort(rng.choice(k, 15, replace=False)).astype(np.int64)
    da = rng.standard_normal((12, d)).astype(np.float32)
    db = rng.standard_normal((15, d)).astype(np.float32)
    ba, bb = np.packbits(da > 0, axis=1), np.packbits(db > 0, axis=1)
    idf = rng.uniform(0.5, 3, size=k)
    for tau in (0.0, 0.25, -0.5):  # 0.25 = 1 − 2·3/8: Hamming 3 sits exactly on τ
        for weights in (np.zeros(0), idf ** 2):
            w = None if weights.size == 0 else idf
            a = {"words": wa, "descriptors": da, "bits": ba}
            b = {"words": wb, "descriptors": db, "bits": bb}
            want = ref.similarity("asmk", a, b, 3.0, tau, False, inclusive, idf=w)
            got = km.asmk_score(wa, da, wb, db, 3.0, tau, inclusive, weights)
            assert got == pytest.approx(want, abs=1e-9)
            want = ref.similarity("asmk_star", a, b, 3.0, tau, False, inclusive, dim=d, idf=w)
            got = km.asmk_star_score(wa, ba, wb, bb, d, 3.0, tau, inclusive, weights)
            assert got == pytest.approx(want, abs=1e-9)


def test_selectivity_strict_and_inclusive():
    assert km.selectivity(0.0, 3.0, 0.0, False) == 0.0
    assert km.selectivity(0.0, 3.0, 0.0, True) == 0.0  # included, but 0³ = 0
    assert km.selectivity(0.5, 3.0, 0.5, False) == 0.0
    assert km.selectivity(0.5, 3.0, 0.5, True) == pytest.approx(0.125)
    assert km.selectivity(-0.5, 3.0, -1.0, False) == pytest.approx(-0.125)


def test_popcount_on_uint64_views_equals_bytes():
    rng = np.random.default_rng(7)
    rows = rng.integers(0, 256, size=(30, 16)).astype(np.uint8)
    wide = kb.as_words64(rows)
    assert wide.dtype == np.uint64 and wide.shape == (30, 2)
    for i in range(29):
        assert kb.hamming(wide[i], wide[i + 1]) == kb.hamming(rows[i], rows[i + 1]) == ref.hamming(rows[i], rows[i + 1])
    assert kb.as_words64(rows[:, :3]).dtype == np.uint8  # 3 bytes: no 64-bit view


def test_popcount64_matches_numpy_bit_count():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.integers(0, 256, (200, 8), dtype=np.uint8).view(np.uint64).ravel(),
                        np.array([0, 1, 2**63, 2**64 - 1, 0x5555555555555555], np.uint64)])
    want = np.unpackbits(x.view(np.uint8)).reshape(len(x), 64).sum(1)
    from numba import njit

    count = njit(lambda v: np.array([kb.popcount64(e) for e in v]))
    np.testing.assert_array_equal(count(x), want)


def _blocked(lists, num_items, old=False):
    """Blocked CSR of per-word ascending item lists: offsets (K·blocks+1,) int64, uint16 ids within the block,
    blocks; ``old``: the previous format (one block of uint32 full ids)."""
    blocks = 1 if old else max(1, -(-num_items // 65536))
    runs = [x[(x >> 16) == b] if blocks > 1 else x for x in lists for b in range(blocks)]
    offsets = np.zeros(len(runs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(x) for x in runs])
    items = np.concatenate(runs) if runs else np.zeros(0, np.int64)
    return offsets, (items.astype(np.uint32) if old else (items % 65536).astype(np.uint16)), blocks


def _postings(rng, num_items, num_words, nbytes, old=False, longest=None):
    """Random blocked CSR posting lists (items ascending within a word) with packed signatures."""
    longest = num_items if longest is None else longest
    lists = [np.sort(rng.choice(num_items, int(rng.integers(0, longest + 1)), replace=False))
             for _ in range(num_words)]
    offsets, items, blocks = _blocked(lists, num_items, old)
    bits = rng.integers(0, 256, size=(items.shape[0], nbytes)).astype(np.uint8)
    return offsets, items, blocks, bits


def _entries(offsets, items, blocks):
    """(word, full item id) of every posting entry of a blocked CSR: the slow obvious decoding."""
    run = np.repeat(np.arange(offsets.shape[0] - 1), np.diff(offsets))
    return run // blocks, (run % blocks) * 65536 + items.astype(np.int64)


def _scan_twin(q_words, q_bits, offsets, items, blocks, bits, dim, alpha, tau, inclusive, weights, num_items):
    """Plain numpy: per query word, Hamming distances by unpackbits, σ from the same tabulated selectivity."""
    table = np.array([km.selectivity(1.0 - 2.0 * h / dim, alpha, tau, inclusive) for h in range(dim + 1)])
    scores = np.zeros(num_items)
    word, full = _entries(offsets, items, blocks)
    for qi, w in enumerate(q_words):
        sel = np.flatnonzero(word == w)
        h = np.unpackbits(np.bitwise_xor(bits[sel], q_bits[qi]), axis=1).sum(1)
        wt = weights[w] if weights.shape[0] else 1.0
        np.add.at(scores, full[sel], table[h] * wt)  # in posting order, like the kernel
    return scores


def _check_scan(rng, m, k, dim, old=False, longest=None, cuts=3):
    from d2r.kernels.ivf import scan_bits_items
    from tests.reference import scan_bits

    nbytes = (dim + 7) // 8
    offsets, items, blocks, bits = _postings(rng, m, k, nbytes, old, longest)
    if dim % 8:
        bits[:, -1] &= np.uint8((0xFF << (8 - dim % 8)) & 0xFF)  # padding bits 0, as pack_bits writes
    nq = min(k, 12)
    q_words = rng.choice(k, nq, replace=False).astype(np.uint32)
    q_bits = rng.integers(0, 256, size=(nq, nbytes)).astype(np.uint8)
    if dim % 8:
        q_bits[:, -1] &= np.uint8((0xFF << (8 - dim % 8)) & 0xFF)
    for tau, inclusive, weights in ((0.0, False, np.zeros(0)), (-0.25, True, rng.uniform(0.5, 3, k))):
        want = _scan_twin(q_words, q_bits, offsets, items, blocks, bits, dim, 3.0, tau, inclusive, weights, m)
        qb, b = kb.as_words64(q_bits), kb.as_words64(bits)
        assert (qb.dtype == np.uint64) == (dim % 64 == 0)
        got = np.zeros(m)
        scan_bits(q_words, qb, offsets, items, blocks, b, dim, 3.0, tau, inclusive, weights, got)
        np.testing.assert_array_equal(got, want)
        edges = list(rng.integers(0, m + 1, cuts))
        if m > 65536:  # ranges that end on, start on and cross block boundaries
            edges += [65536, 65535 + int(rng.integers(0, 3)), 131072 + int(rng.integers(-5, 6))]
        edges = np.sort(np.clip(edges, 0, m))
        parts = np.zeros(m)  # item ranges in any split: disjoint writes, same sums
        for first, stop in zip([0, *edges], [*edges, m]):
            scan_bits_items(q_words, qb, offsets, items, blocks, b, dim, 3.0, tau, inclusive, weights, parts,
                            first, stop)
        np.testing.assert_array_equal(parts, want)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dim", [128, 64, 96, 100, 256])
def test_scan_bits_matches_numpy_twin_and_item_ranges_are_exact(seed, dim):
    _check_scan(np.random.default_rng(seed), 60, 25, dim)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("old", [False, True])
def test_scan_bits_over_item_blocks(seed, old):
    """200,000 items: 4 blocks of uint16 ids (or the previous format's uint32 ids); scans over item ranges
    crossing block boundaries are bit-identical to a full scan and to the numpy twin."""
    rng = np.random.default_rng(100 + seed)
    _check_scan(rng, 200_000, 5, [128, 96][seed % 2], old=old, longest=20_000, cuts=6)


@pytest.mark.parametrize("seed", range(3))
def test_posting_walks_over_item_blocks(seed):
    """document_frequency, item_weight_sums and scan_residuals against numpy on 4 and 1 item blocks."""
    from d2r.kernels.ivf import document_frequency, item_weight_sums, scan_residuals

    rng = np.random.default_rng(200 + seed)
    m, k, d = 200_000 - 17 * seed, 4, 8
    for old in (False, True):
        offsets, items, blocks, _ = _postings(rng, m, k, 1, old, longest=15_000)
        word, full = _entries(offsets, items, blocks)
        live = rng.random(m) < 0.7
        np.testing.assert_array_equal(document_frequency(offsets, items, blocks, live),
                                      np.bincount(word[live[full]], minlength=k))
        weights = rng.uniform(0.5, 2, k)
        want = np.zeros(m)
        np.add.at(want, full, weights[word])
        np.testing.assert_array_equal(item_weight_sums(offsets, items, blocks, weights, m), want)
        desc = rng.standard_normal((items.shape[0], d)).astype(np.float32)
        q_words = np.array([1, 3], np.uint32)
        q_desc = rng.standard_normal((2, d)).astype(np.float32)
        want = np.zeros(m)
        for qi, w in enumerate(q_words):
            sel = np.flatnonzero(word == w)
            u = desc[sel].astype(np.float64) @ q_desc[qi].astype(np.float64)
            s = np.array([km.selectivity(x, 3.0, 0.0, False) for x in u])
            np.add.at(want, full[sel], s)
        got = np.zeros(m)
        scan_residuals(q_words, q_desc, offsets, items, blocks, desc, 3.0, 0.0, False, np.zeros(0), got)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_check_postings_flags_range_and_order():
    from d2r.kernels.ivf import check_postings

    offsets = np.array([0, 3, 3, 5], np.int64)
    items = np.array([0, 2, 2, 1, 4], np.uint32)
    assert check_postings(offsets, items, 1, 5) == 0
    assert check_postings(offsets, items, 1, 4) == 1
    items[1] = 3  # 3 then 2 within word 0
    assert check_postings(offsets, items, 1, 5) == 2
    items[:] = [0, 1, 4, 4, 3]  # 4 then 3 within word 2
    assert check_postings(offsets, items, 1, 5) == 2
    items[:] = [3, 4, 4, 0, 1]
    assert check_postings(offsets, items, 1, 5) == 0


@pytest.mark.parametrize("seed", range(4))
def test_check_postings_over_item_blocks(seed):
    """Codes 1 (an id past the item count in the last block) and 2 (disorder within a (word, block) run);
    a run starting lower than the previous block's run ended is in order."""
    from d2r.kernels.ivf import check_postings

    rng = np.random.default_rng(300 + seed)
    m = 200_000 + int(rng.integers(-1000, 1000))
    offsets, items, blocks, _ = _postings(rng, m, 3, 1, longest=30_000)
    assert blocks == 4 and check_postings(offsets, items, blocks, m) == 0
    last = m - 3 * 65536  # ids of the last block: [0, last)
    runs = [r for r in range(offsets.shape[0] - 1) if offsets[r + 1] - offsets[r] >= 2]
    tail = [r for r in runs if r % blocks == blocks - 1]
    bad = items.copy()
    bad[offsets[tail[0] + 1] - 1] = last + int(rng.integers(0, 65536 - last))  # past the item count
    assert check_postings(offsets, bad, blocks, m) == 1
    assert check_postings(offsets, bad, blocks, m + 65536) == 0  # in range for a bigger segment
    bad = items.copy()
    r = runs[int(rng.integers(len(runs)))]
    bad[offsets[r]], bad[offsets[r] + 1] = bad[offsets[r] + 1], bad[offsets[r]]
    assert check_postings(offsets, bad, blocks, m) == 2
    bad = items.copy()
    bad[offsets[runs[0]]: offsets[runs[0] + 1]] = np.sort(bad[offsets[runs[0]]: offsets[runs[0] + 1]])[::-1]
    assert check_postings(offsets, bad, blocks, m) == 2


@pytest.mark.parametrize("seed", range(6))
def test_top_k_equals_stable_argsort(seed):
    from d2r.index.search import top_k

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    s = rng.integers(-3, 4, n).astype(np.float64)  # many exact ties
    if seed % 2:
        s = np.sort(s) if seed == 1 else rng.standard_normal(n)  # ascending input: every element displaces
    s[rng.random(n) < 0.1] = -np.inf
    for k in (1, 2, 7, n // 2, n, n + 3):
        np.testing.assert_array_equal(top_k(s, k), np.argsort(-s, kind="stable")[:k])


@pytest.mark.parametrize("weighted", [False, True])
def test_normalize_scores_matches_numpy(weighted):
    from d2r.kernels.ivf import normalize_scores

    rng = np.random.default_rng(5)
    m = 300
    item_words = rng.integers(0, 4, m).astype(np.uint32)
    sums = rng.uniform(0, 2, m) * (item_words > 0) if weighted else item_words
    scores = rng.standard_normal(m)
    norm = np.sqrt(7.3 * sums)
    want = scores.copy()
    np.divide(want, norm, out=want, where=norm > 0)
    want[item_words == 0] = -1.0
    normalize_scores(scores, 7.3, sums, item_words, -1.0)
    np.testing.assert_array_equal(scores, want)


@pytest.mark.parametrize("seed", range(4))
def test_lower_bound_equals_searchsorted(seed):
    from d2r.kernels.ivf import _lower_bound

    rng = np.random.default_rng(seed)
    for _ in range(200):
        m = int(rng.integers(1, 60))
        n = int(rng.integers(0, 40))
        items = np.sort(rng.integers(0, m, n)).astype(np.uint32)  # duplicates; clusters below
        if rng.random() < 0.3:
            items = np.sort(rng.integers(0, max(1, m // 5), n)).astype(np.uint32)
        pad = int(rng.integers(0, 3))
        arr = np.concatenate([np.full(pad, m - 1, np.uint32), items, np.zeros(pad, np.uint32)])
        for value in range(-1, m + 2):
            want = pad + int(np.searchsorted(items, value, side="left"))
            assert _lower_bound(arr, pad, pad + n, value, m) == want


@pytest.mark.parametrize("m,old", [(300, False), (300, True), (140_000, False)])
def test_item_entries_read_back_every_posting_of_an_item(m, old):
    """Database.record reads an image's words and payload rows back from a segment's postings: the kernel
    finds exactly the entries the slow decoding assigns to that item (blocked layout across blocks, and the
    previous format's full uint32 ids)."""
    from d2r.kernels.ivf import item_entries

    rng = np.random.default_rng(m + old)
    offsets, items, blocks, _ = _postings(rng, m, 40, 16, old, longest=min(m, 5000))
    word, full = _entries(offsets, items, blocks)
    for item in list(rng.integers(0, m, 25)) + [0, m - 1] + ([65535, 65536, 131071] if m > 131072 else []):
        got_w, got_e = item_entries(offsets, items, blocks, int(item))
        want_e = np.flatnonzero(full == item)
        np.testing.assert_array_equal(got_e, want_e)
        np.testing.assert_array_equal(got_w, word[want_e])
