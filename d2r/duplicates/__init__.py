"""Near-duplicate detection: the Goldberg image signature (Wong, Bern & Goldberg, ICIP 2002, with the
parameters of the PyPI ``image-match`` package), a signature index on the storage layer with candidate retrieval
by signature words and exact re-scoring, and grouping of near-duplicates (``d2r duplicates``).

- :mod:`d2r.duplicates.signature`: :func:`~d2r.duplicates.signature.signature` (648,) int8 of one image;
- :mod:`d2r.duplicates.index`: :class:`~d2r.duplicates.index.SignatureIndex`;
- :mod:`d2r.duplicates.find`: :func:`~d2r.duplicates.find.find_duplicates` (groups of near-duplicates).
"""

from d2r.duplicates.find import DuplicatesReport, Pair, find_duplicates, write_page
from d2r.duplicates.index import SignatureIndex
from d2r.duplicates.signature import SignatureConfig, signature, signature_of_pixels, words

__all__ = ["DuplicatesReport", "Pair", "find_duplicates", "write_page", "SignatureIndex", "SignatureConfig",
           "signature", "signature_of_pixels", "words"]
