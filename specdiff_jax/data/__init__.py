"""Training data: the Python-source corpus (a TFDS dataset) and the packed Grain input pipeline.

TensorFlow is never imported: the corpus is written and read as array_record through TFDS's random-access
data sources. The names below are imported on first use (PEP 562), so `import specdiff_jax.data` (and the
package) works on machines without grain or tensorflow-datasets, such as an accelerator image that only decodes.
"""

import importlib

_LAZY = {"CorpusError": "corpus", "load_split": "corpus", "prepare_corpus": "corpus", "packed_dataset": "pipeline"}

__all__ = ["CorpusError", "load_split", "packed_dataset", "prepare_corpus"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
