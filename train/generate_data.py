"""Sample calibration data from the verifier: completions of corpus-train prompts, written as a TFDS
dataset (docs/METHOD.md §6).

    python -m train.generate_data --config configs/calibrate/generate_tiny.yaml [key=value ...]
    python -m train.generate_data --config configs/pairs/dream7b_qwen2.5-72b.yaml --dry-run   # memory plan only
    python -m train.generate_data --config configs/pairs/dream7b_qwen2.5-72b.yaml --dry-run --compiled  # + XLA's

Reads the `generate` section (and `data.data_dir` / `data.tokenizer` for the corpus and tokenizer) of a run config
(configs/defaults.yaml lists every key). Prompts are snippets of the corpus *train* split that overlap no
evaluation prompt (HumanEval, the validation split, `generate.eval_files`); see specdiff_jax.data.verifier_data.
Each prompt gets `samples_per_prompt` completions from the verifier (the jitted decode kernel's `ar` method,
batched, temperature / top-k / top-p from the config). Every finished batch is saved at once under
`<out_dir>/_work/`, so an interrupted run loses nothing: rerunning the same command continues where it stopped
(a different config there is refused). At the end the dataset `verifier_completions` is written under `out_dir`
with its provenance (verifier path and hashes, sampling settings, seed, corpus, overlap counts) in its metadata.
Exit status: 0 done, 2 bad input (including a prompt that overlaps the evaluation set).
"""

from __future__ import annotations

import argparse
import sys

from specdiff_jax.checkpoint import CheckpointError
from specdiff_jax.cli import fail
from specdiff_jax.config import ConfigError
from specdiff_jax.config.run import load_config
from specdiff_jax.data.corpus import CorpusError
from specdiff_jax.data.generation import WORK, generate  # noqa: F401  WORK: the resumable work dir's name
from specdiff_jax.data.verifier_data import DataOverlapError
from specdiff_jax.dryrun import COMPILED_HELP, compiled_layers
from specdiff_jax.tokenizer import TokenizerError


def generation_plan(cfg):
    """The config whose decode dry run is data generation: `ar` decoding of the verifier (generate.verifier's
    model_config.json when it exists, else pair.verifier_config) on generate.batch_size rows of
    generate.prompt_tokens + max_new_tokens tokens."""
    import dataclasses
    from pathlib import Path

    from specdiff_jax.config import ModelConfig
    from specdiff_jax.dryrun import verifier_config

    g = cfg.generate
    mc = Path(g.verifier) / "model_config.json"
    model = ModelConfig.load(mc) if mc.is_file() else verifier_config(cfg)
    if model is None:
        raise ConfigError(f"generate.verifier={g.verifier!r} is not a model directory (no model_config.json) and "
                          "pair.verifier_config is not set: give one of them for a dry run")
    pair = dataclasses.replace(cfg.pair, verifier_config=None, batch_size=g.batch_size,
                               prompt_tokens=g.prompt_tokens, max_new_tokens=g.max_new_tokens)
    return cfg.replace(model=model, pair=pair)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.generate_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML run config with a generate section")
    p.add_argument("--dry-run", action="store_true", help="per-device memory of the verifier's generate calls on "
                   "the config's mesh (nothing allocated); exit 2 if it does not fit")
    p.add_argument("--compiled", action="store_true", help=COMPILED_HELP)
    p.add_argument("--compiled-layers", default="2,4", metavar="L1,L2", help="the two layer counts compiled")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides with dotted keys")
    args = p.parse_intermixed_args(argv)
    if args.dry_run:
        from specdiff_jax.cli import run_program
        from specdiff_jax.dryrun import run as dry_run

        try:
            cfg = generation_plan(load_config(args.config, args.overrides))
            layers = compiled_layers(args.compiled_layers) if args.compiled else None
        except (ConfigError, FileNotFoundError) as e:
            return fail(e)
        g = cfg.generate
        sampling = dict(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
        return run_program(lambda: dry_run(cfg, "decode", compiled=layers, sampling=sampling))[0] or 0
    try:
        generate(load_config(args.config, args.overrides))
    except (ConfigError, DataOverlapError, CorpusError, CheckpointError, TokenizerError, FileNotFoundError,
            ValueError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
