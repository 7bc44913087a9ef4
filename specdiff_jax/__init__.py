"""specdiff-jax: SpecDiff-2 speculative decoding with masked-diffusion drafters, in JAX/Flax."""

from specdiff_jax.cache import KVCache
from specdiff_jax.checkpoint import load_pretrained, save_pretrained
from specdiff_jax.config import ConfigError, ModelConfig
from specdiff_jax.model import Transformer, layout_mask
from specdiff_jax.decode import Decoder, GenerateOutput, generate

__all__ = ["ConfigError", "KVCache", "ModelConfig", "Transformer", "layout_mask", "load_pretrained", "save_pretrained"]
__all__ += ["Decoder", "GenerateOutput", "generate"]
from specdiff_jax.tokenizer import Tokenizer, load_tokenizer

__all__ += ["Tokenizer", "load_tokenizer"]
