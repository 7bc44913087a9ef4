"""Training data: the Python-source corpus (a TFDS dataset) and the packed Grain input pipeline.

TensorFlow is never imported: the corpus is written and read as array_record through TFDS's random-access
data sources.
"""

from specdiff_jax.data.corpus import CorpusError, load_split, prepare_corpus
from specdiff_jax.data.pipeline import packed_dataset

__all__ = ["CorpusError", "load_split", "packed_dataset", "prepare_corpus"]
