"""specdiff-jax: SpecDiff-2 speculative decoding with masked-diffusion drafters, in JAX/Flax (docs/METHOD.md).

The front door: models (`Transformer`, `ModelConfig`, `load_pretrained` for our model directories and Hugging
Face ones, `save_pretrained`), tokenizers, and decoding (`generate`, `Decoder`).
"""

from specdiff_jax.cache import KVCache
from specdiff_jax.checkpoint import save_pretrained
from specdiff_jax.config import ConfigError, ModelConfig
from specdiff_jax.hf_checkpoint import load_pretrained
from specdiff_jax.decode import Decoder, GenerateOutput, generate
from specdiff_jax.model import Transformer, layout_mask
from specdiff_jax.tokenizer import Tokenizer, load_tokenizer

__all__ = ["ConfigError", "Decoder", "GenerateOutput", "KVCache", "ModelConfig", "Tokenizer", "Transformer",
           "generate", "layout_mask", "load_pretrained", "load_tokenizer", "save_pretrained"]
