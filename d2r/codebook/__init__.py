"""The visual vocabulary: the :class:`Codebook` (assignment, save/load, fit to an extractor), k-means training
and the conversion of official codebooks."""

from d2r.codebook.codebook import Codebook, check_codebook, default_codebook_name, fit_codebook
from d2r.codebook.config import CodebookConfig
from d2r.codebook.kmeans import load_training_descriptors, sample_descriptors, train_codebook

__all__ = ["Codebook", "CodebookConfig", "check_codebook", "default_codebook_name", "fit_codebook",
           "load_training_descriptors", "sample_descriptors", "train_codebook"]
