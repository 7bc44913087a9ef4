"""Convert checkpoints between Hugging Face and specdiff-jax model directories (`specdiff_jax.hf_checkpoint`).

    python -m specdiff_jax.convert --from-hf HF_DIR --out OUR_DIR [--dtype float32|bfloat16]
    python -m specdiff_jax.convert --to-hf OUR_DIR --out HF_DIR

Exit status: 0 done, 2 bad input (`specdiff_jax.cli`). The converter's library names are re-exported here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specdiff_jax.checkpoint import CheckpointError
from specdiff_jax.cli import fail
from specdiff_jax.config import ConfigError
from specdiff_jax.hf_checkpoint import (  # noqa: F401  re-exported
    PARAM_TABLE, ConversionError, config_from_hf, config_to_hf, copy_tokenizer, from_hf, load_hf, load_pretrained,
    param_mapping, to_hf, tokenizer_size,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specdiff_jax.convert", description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-hf", metavar="DIR", help="HF directory (config.json + *.safetensors) to convert")
    g.add_argument("--to-hf", metavar="DIR", help="our model directory (or an HF one) to export to HF format")
    ap.add_argument("--out", metavar="DIR", required=True, help="output directory")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="parameter/compute dtype of the converted model (default: from the source)")
    args = ap.parse_args(argv)
    try:
        if args.from_hf:
            out = from_hf(args.from_hf, args.out, dtype=args.dtype)
        else:
            out = to_hf(load_pretrained(args.to_hf, dtype=args.dtype), args.out)
            copy_tokenizer(Path(args.to_hf), Path(args.out))
    except (CheckpointError, ConfigError, OSError) as e:
        return fail(e)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
