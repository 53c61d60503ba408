"""The one storage layer under the feature store and the index: log-structured folders of immutable parts.

- :mod:`~d2r.storage.files`: hashed ``.npy`` files (:class:`NpyWriter`, :func:`save_array`), the row reader
  (:class:`RowReader`), file records ``{"size", "blake2b"}`` and :class:`DamagedError`;
- :mod:`~d2r.storage.manifest`: manifests as untrusted JSON (schema check, old keys converted);
- :mod:`~d2r.storage.generations`: generations as the commit point, lock-free reading, garbage collection;
- :mod:`~d2r.storage.tiers`: the tier policy of merges;
- :mod:`~d2r.storage.rows`: rows keyed by unique int64 ids in segments (:class:`~d2r.storage.rows.IdRows`), the base
  of the global index and the signature index.

Each store keeps its payload format (:mod:`d2r.index.segment`, :mod:`d2r.features.store.format`) and its own
parameters (an instance of :class:`Generations` and of :class:`TierPolicy`).
"""

from d2r.storage.files import (HINTS, DamagedError, NpyWriter, RowReader, check_file, file_record, read_header,
                               save_array, verify_file)
from d2r.storage.generations import MANIFEST, Generations, generation_file
from d2r.storage.manifest import DIGEST, RECORD, Int, Map, OneOf, Opt, Text, convert, load_json, validate
from d2r.storage.tiers import TierPolicy

__all__ = ["HINTS", "DamagedError", "NpyWriter", "RowReader", "check_file", "file_record", "read_header",
           "save_array", "verify_file", "MANIFEST", "Generations", "generation_file", "DIGEST", "RECORD", "Int",
           "Map", "OneOf", "Opt", "Text", "convert", "load_json", "validate", "TierPolicy"]
