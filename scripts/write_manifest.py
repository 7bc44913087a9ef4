"""Copy trained exports into assets/tiny/ and record them in assets/tiny/MANIFEST.json (used by make_assets.sh).

    python scripts/write_manifest.py --stage base|calibrated|hashes [--runs runs] [--commands-file FILE]
                                     [--kd kd_first|kd_window|auto|keep --report runs/report/report.json]
                                     [--serve 0=drafter_streak_t0 --serve 1=drafter_streak_t1]

For each model: parameters, layout, validation loss (nats/token), training tokens and steps (from the export's
metadata), and the commands that made it (from --commands-file, a JSON {asset: [commands]}, when given; otherwise
the reproduction command of scripts/make_assets.sh) and the sha256 of every file. The calibrated stage ships one SpecDiff-2 drafter per
decoding temperature (`--serve T=RUN`: the export of RUN under --runs becomes assets/tiny/drafter_streak_t<T>, recorded
with `serves_temperature` T, its calibration data and, from --report, its tau with the 95% bootstrap interval at
draft temperature T) and one KD drafter (`--kd`; `auto` picks the one with more tokens per verifier call in the
calibration report, whose table is then recorded in the manifest too; `keep` leaves the shipped one as it is).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from specdiff_jax.checkpoint import load_metadata
from specdiff_jax.config import ModelConfig

ASSETS = Path("assets/tiny")
STAGES = {
    "base": {"verifier": "verifier", "drafter_base": "drafter_base", "drafter_ar": "drafter_ar"},
    "calibrated": {},  # the per-temperature drafters named by --serve, the KD drafter chosen by --kd
    "hashes": {},  # copy nothing: only refresh every model's file hashes
}
KD_ASSETS = ("drafter_kd_first", "drafter_kd_window")
STALE = ("drafter_streak",)  # single-temperature SpecDiff-2 drafter, replaced by the per-temperature ones


def parse_serve(items: list[str]) -> dict[float, str]:
    """["0=drafter_streak_t0", ...] -> {0.0: "drafter_streak_t0", ...}."""
    out = {}
    for item in items:
        t, sep, run = item.partition("=")
        try:
            out[float(t)] = run
        except ValueError:
            raise SystemExit(f"error: --serve {item!r} must be TEMPERATURE=RUN, e.g. 0=drafter_streak_t0") from None
        if not sep or not run:
            raise SystemExit(f"error: --serve {item!r} must be TEMPERATURE=RUN, e.g. 0=drafter_streak_t0")
    return out


def asset_name(t: float) -> str:
    return f"drafter_streak_t{t:g}".replace(".", "p")


def report_row(report: dict | None, name: str, t: float) -> dict | None:
    """The report's kernel row of drafter `name` (its asset name without `drafter_`) at draft temperature t."""
    for r in (report or {}).get("kernel", []):
        if r["drafter"] == name and float(r["draft_temperature"]) == t:
            return {"tau": r["tokens_per_verifier_call"], "tau_ci95": r.get("tau_ci95"), "draft_temperature": t,
                    "prompts": r.get("prompts"), "gamma": r.get("gamma"),
                    "verifier_temperature": r.get("verifier_temperature", 0.0), "alpha": r.get("alpha")}
    return None


def serving_fields(asset: str, t: float, calib: dict | None, report: dict | None,
                   served: dict | None = None) -> dict:
    """Manifest fields of a per-temperature drafter: what it serves, what it was calibrated on, its measured tau
    (greedy verifier, `report`) and, for T > 0, its tau where it serves (verifier sampling at T, `served`)."""
    data = (calib or {}).get("data") or {}
    sampling = None
    if data.get("dataset"):
        try:
            from specdiff_jax.data import verifier_data as vd

            sampling = vd.provenance(data["dataset"]).get("sampling")
        except (FileNotFoundError, KeyError, ValueError, OSError):
            sampling = None
    out = {"serves_temperature": t, "calibration_data": dict(data, sampling=sampling),
           "calibration_report": report_row(report, asset.removeprefix("drafter_"), t)}
    if t > 0:
        out["served_report"] = report_row(served, asset.removeprefix("drafter_"), t)
    return out


def file_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of every file of a model directory, by path relative to it (what tests/test_assets.py checks)."""
    return {str(p.relative_to(model_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(model_dir.rglob("*")) if p.is_file()}


def pick_kd(kd: str, report: dict | None) -> str:
    if kd == "keep":
        return ""
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
    ap.add_argument("--serve", action="append", default=[], metavar="T=RUN",
                    help="ship run dir RUN under --runs as assets/tiny/drafter_streak_t<T>, serving temperature T")
    ap.add_argument("--kd", choices=["kd_first", "kd_window", "auto", "keep"], default="auto")
    ap.add_argument("--report", default=None, help="calibration report.json (eval/calibration_report.py)")
    ap.add_argument("--served-report", default=None, help="a calibration report.json measured with the verifier "
                    "sampling at the served temperature (--verifier-temperature T): the tau of drafters serving T > 0")
    args = ap.parse_args()
    report = json.loads(Path(args.report).read_text()) if args.report else None
    served_report = json.loads(Path(args.served_report).read_text()) if args.served_report else None
    commands = json.loads(Path(args.commands_file).read_text()) if args.commands_file else {}
    manifest_path = ASSETS / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": {}}
    stage = dict(STAGES[args.stage])
    serve = parse_serve(args.serve)
    if args.stage == "calibrated":
        kd = pick_kd(args.kd, report)
        if kd:
            stage[kd] = kd
        else:
            kd = next((k for k in KD_ASSETS if k in manifest["models"]), None)
        stage.update({asset_name(t): run for t, run in serve.items()})
        stale = [k for k in KD_ASSETS if k != kd] + (list(STALE) if serve else [])
        for other in stale:  # one KD drafter is shipped; per-temperature drafters replace drafter_streak
            if (ASSETS / other).exists():
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
        served = {asset_name(t): t for t in serve}
        if asset in served:
            manifest["models"][asset].update(serving_fields(asset, served[asset], manifest["models"][asset]
                                                            ["calibration_eval"], report, served_report))
    for rec in manifest["models"].values():
        rec["files"] = file_hashes(Path(rec["path"]))
    tok = ASSETS / "tokenizer.model"
    manifest["tokenizer"] = {"path": str(tok), "sha256": hashlib.sha256(tok.read_bytes()).hexdigest(),
                             "commands": ["bash scripts/prepare_data.sh data"]}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {manifest_path}: {', '.join(manifest['models'])}")


if __name__ == "__main__":
    main()
