"""Copy trained exports into assets/tiny/ and record them in assets/tiny/MANIFEST.json (used by make_assets.sh).

    python scripts/write_manifest.py --stage base|calibrated [--runs runs] [--commands-file FILE]
                                     [--kd kd_first|kd_window|auto --report runs/report/report.json]
                                     [--streak-run drafter_ce_streak]

For each model: parameters, layout, validation loss (nats/token), training tokens and steps (from the export's
metadata), and the commands that made it (from --commands-file, a JSON {asset: [commands]}, when given; otherwise
the reproduction command of scripts/make_assets.sh). The calibrated stage ships the streak drafter and one KD
drafter (`--streak-run`: the run under --runs whose export becomes assets/tiny/drafter_streak, the SpecDiff-2
drafter; `--kd`; `auto` picks the one with more tokens per verifier call in the calibration report, whose table
is then recorded in the manifest too).
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
    "calibrated": {},  # drafter_streak from the run named by --streak-run, the KD drafter chosen by --kd
}
KD_ASSETS = ("drafter_kd_first", "drafter_kd_window")


def pick_kd(kd: str, report: dict | None) -> str:
    if kd != "auto":
        return f"drafter_{kd}"
    if report is None:
        raise SystemExit("error: --kd auto needs --report (eval/calibration_report.py's report.json)")
    tau = {r["drafter"]: r["tokens_per_verifier_call"] for r in report["kernel"] if r["draft_temperature"] == 0}
    missing = [k for k in ("kd_first", "kd_window") if k not in tau]
    if missing:
        raise SystemExit(f"error: the report has no greedy-drafting row for {missing}; pass --kd explicitly")
    return "drafter_kd_first" if tau["kd_first"] >= tau["kd_window"] else "drafter_kd_window"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=list(STAGES), required=True)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--commands-file", default=None)
    ap.add_argument("--streak-run", default="drafter_streak",
                    help="run dir under --runs shipped as assets/tiny/drafter_streak (e.g. drafter_ce_streak)")
    ap.add_argument("--kd", choices=["kd_first", "kd_window", "auto"], default="auto")
    ap.add_argument("--report", default=None, help="calibration report.json (eval/calibration_report.py)")
    args = ap.parse_args()
    report = json.loads(Path(args.report).read_text()) if args.report else None
    commands = json.loads(Path(args.commands_file).read_text()) if args.commands_file else {}
    manifest_path = ASSETS / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": {}}
    stage = dict(STAGES[args.stage])
    if args.stage == "calibrated":
        kd = pick_kd(args.kd, report)
        stage[kd] = kd
        stage["drafter_streak"] = args.streak_run
        for other in KD_ASSETS:  # one KD drafter is shipped: remove the other's stale copy
            if other != kd and (ASSETS / other).exists():
                shutil.rmtree(ASSETS / other)
                manifest["models"].pop(other, None)
        if report is not None:
            manifest["calibration_report"] = {"kernel": report["kernel"], "windows": report.get("windows"),
                                              "meta": report.get("meta"), "shipped_kd": kd}
    for asset, run in stage.items():
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
