"""Global descriptors: one vector per image from a CNN feature map, searched by inner product.

The pooling family (:mod:`~d2r.globaldesc.pooling`), pre-processing (:mod:`~d2r.globaldesc.preprocess`),
post-processing (:mod:`~d2r.globaldesc.postprocess`) and the index (:mod:`~d2r.globaldesc.index`) are core
numpy; only :class:`GlobalExtractor`'s backbone needs torch (the ``[learned]`` extra) and the IVF-PQ option
faiss (the ``[faiss]`` extra), both imported when first used.

    from d2r.globaldesc import GlobalConfig, GlobalExtractor, GlobalIndex
    ex = GlobalExtractor(GlobalConfig(backbone="mobilenet_v2", pooling="gem"))
    index = GlobalIndex.create("global-index", ex.dim)
    index.add([0], ex.extract("photo.jpg")[None]); index.save()
    ids, scores = index.search(ex.extract("query.jpg"), top_k=100)
"""

from d2r.globaldesc.extractor import GlobalConfig, GlobalExtractor
from d2r.globaldesc.index import GlobalDamagedError, GlobalIndex
from d2r.globaldesc.pooling import POOLINGS
from d2r.globaldesc.postprocess import Whitening, alpha_qe, dba, k_reciprocal, l2_normalize

__all__ = ["GlobalConfig", "GlobalExtractor", "GlobalIndex", "GlobalDamagedError", "POOLINGS", "Whitening",
           "alpha_qe", "dba", "k_reciprocal", "l2_normalize"]
