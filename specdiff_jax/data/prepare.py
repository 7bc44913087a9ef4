"""Prepare the default corpus and train the default tokenizer (what scripts/prepare_data.sh runs).

    python -m specdiff_jax.data.prepare --data-dir data --tokenizer-dir assets/tiny --vocab-size 4096

Prints the corpus stats, the tokenizer's characters per token on the validation split and the timings, and
records the latter in tokenizer_config.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from specdiff_jax.data.corpus import load_split, prepare_corpus
from specdiff_jax.tokenizer import CONFIG_FILE, train_tokenizer


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="data", help="where the TFDS corpus is written (git-ignored)")
    ap.add_argument("--tokenizer-dir", default="assets/tiny", help="where tokenizer.model etc. are written")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--source-dir", action="append", default=None,
                    help="a source directory (repeatable); 'stdlib' and 'site-packages' name the interpreter's "
                         "trees; default: stdlib + site-packages")
    ap.add_argument("--no-site-packages", action="store_true", help="default sources without site-packages")
    ap.add_argument("--val-fraction", type=float, default=0.02)
    ap.add_argument("--max-bytes", type=int, default=None, help="cap on the total corpus bytes")
    ap.add_argument("--overwrite", action="store_true", help="re-prepare a corpus made with other arguments")
    ap.add_argument("--skip-tokenizer", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    stats = prepare_corpus(args.data_dir, args.source_dir, val_fraction=args.val_fraction,
                           max_bytes=args.max_bytes, include_site_packages=not args.no_site_packages,
                           overwrite=args.overwrite)
    report = {"corpus": stats, "corpus_seconds": round(time.perf_counter() - t0, 1)}
    if not args.skip_tokenizer:
        t1 = time.perf_counter()
        tok = train_tokenizer(args.data_dir, args.tokenizer_dir, vocab_size=args.vocab_size)
        report["tokenizer_seconds"] = round(time.perf_counter() - t1, 1)
        val = load_split(args.data_dir, "validation")
        chars = tokens = 0
        mismatches = 0
        for i in range(len(val)):
            text = val[i]["text"]
            ids = tok.encode(text)
            mismatches += tok.decode(ids) != text
            chars, tokens = chars + len(text), tokens + len(ids)
        report["tokenizer"] = {"vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "eos_id": tok.eos_id,
                               "mask_id": tok.mask_id, "validation_chars_per_token": round(chars / tokens, 3),
                               "validation_tokens": tokens, "validation_round_trip_failures": mismatches}
        from pathlib import Path

        cfg_path = Path(args.tokenizer_dir) / CONFIG_FILE
        cfg = json.loads(cfg_path.read_text())
        cfg["validation_chars_per_token"] = report["tokenizer"]["validation_chars_per_token"]
        cfg["corpus"] = {k: stats[k] for k in ("files_train", "bytes_train", "files_validation", "bytes_validation")}
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        if mismatches:
            print(f"ERROR: {mismatches} validation files do not round-trip", file=sys.stderr)
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
