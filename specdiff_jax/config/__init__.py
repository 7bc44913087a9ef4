"""Configuration, one package with two parts.

- `specdiff_jax.config.model`: `ModelConfig`, the architecture of one transformer (stored as model_config.json in
  every model directory), and `ConfigError`; both are re-exported here.
- `specdiff_jax.config.run`: `RunConfig`, what a program runs with (model, data, train, mesh, checkpoint, generate,
  calibrate, pair sections), loaded from YAML + `key=value` overrides by `load_config`.

The sharding policy (`DEFAULT_AXIS_RULES`) lives with the sharding code, in `specdiff_jax.sharding`.
"""

from specdiff_jax.config.model import ATTENTION_LAYOUTS, DTYPES, ConfigError, ModelConfig, check_verifier, jax_dtype

__all__ = ["ATTENTION_LAYOUTS", "DTYPES", "ConfigError", "ModelConfig", "check_verifier", "jax_dtype"]
