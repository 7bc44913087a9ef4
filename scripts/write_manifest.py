"""Copy trained exports into assets/tiny/ and record them in assets/tiny/MANIFEST.json (used by make_assets.sh).

    python scripts/write_manifest.py --stage base|calibrated [--runs runs] [--commands-file FILE]

For each model: parameters, layout, validation loss (nats/token), training tokens and steps (from the export's
metadata), and the commands that made it (from --commands-file, a JSON {asset: [commands]}, when given; otherwise
the reproduction command of scripts/make_assets.sh).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from specdiff_jax.checkpoint import load_metadata
from specdiff_jax.config import ModelConfig

ASSETS = Path("assets/tiny")
STAGES = {
    "base": {"verifier": "verifier", "drafter_base": "drafter_base", "drafter_ar": "drafter_ar"},
    "calibrated": {"drafter_streak": "drafter_streak", "drafter_kd_window": "drafter_kd_window"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=list(STAGES), required=True)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--commands-file", default=None)
    args = ap.parse_args()
    commands = json.loads(Path(args.commands_file).read_text()) if args.commands_file else {}
    manifest_path = ASSETS / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": {}}
    for asset, run in STAGES[args.stage].items():
        export = Path(args.runs) / run / "export"
        if not export.is_dir():
            raise SystemExit(f"error: {export} does not exist: run the training step for {asset} first")
        dest = ASSETS / asset
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(export, dest)
        cfg = ModelConfig.load(dest / "model_config.json")
        meta = load_metadata(dest) or {}
        calib = Path(args.runs) / run / "calibration_eval.json"
        manifest["models"][asset] = {
            "path": str(dest), "parameters": cfg.num_params(), "attention": cfg.attention,
            "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
            "objective": meta.get("objective"), "steps": meta.get("step"), "training_tokens": meta.get("tokens_seen"),
            "val_loss_nats_per_token": meta.get("val_loss"), "val_bits_per_token": meta.get("val_bits_per_token"),
            "calibration_eval": json.loads(calib.read_text()) if calib.exists() else None,
            "commands": commands.get(asset, [f"bash scripts/make_assets.sh  # {asset}"]),
        }
    manifest["tokenizer"] = {"path": str(ASSETS / "tokenizer.model"),
                             "commands": ["bash scripts/prepare_data.sh data"]}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {manifest_path}: {', '.join(manifest['models'])}")


if __name__ == "__main__":
    main()
