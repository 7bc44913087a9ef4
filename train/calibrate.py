"""Calibrate (align) a block-causal diffusion drafter to its verifier on verifier-generated data (docs/METHOD.md §6).

    python -m train.calibrate --config configs/calibrate/tiny.yaml --workdir runs/drafter_streak loss=streak
    python -m train.calibrate --config configs/calibrate/tiny.yaml --workdir runs/drafter_kd_window loss=kd_window

`loss=X` is short for `calibrate.loss=X` (streak | ce_streak | kd_first | kd_window | mdlm); every other key of
configs/defaults.yaml may be overridden with its dotted name. The drafter starts from `train.init_from` (its model
config is taken from there), trains on the windows of `calibrate.data_dir` (train/generate_data.py) with the
pre-training loop of specdiff_jax.training (same optimizer, sharding, Orbax checkpoints with exact resume,
progress bar, metrics.jsonl / TensorBoard; rerun the same command to resume), the verifier frozen. Training
metrics include the expected streak and alpha_1 / alpha_mid / alpha_last on the training windows; the validation
loss is on held-out windows (the dataset's validation split). At the end the exported drafter (<workdir>/export)
is evaluated on held-out windows (expected streak, alpha_j) and, with the verifier, by the decode kernel
(greedy; tokens per verifier call, alpha_j) on held-out prompts: <workdir>/calibration_eval.json.
Exit status: 0 done or interrupted-and-saved, 1 training stopped, 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

EVAL_FILE = "calibration_eval.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML run config (e.g. configs/calibrate/tiny.yaml)")
    p.add_argument("--workdir", default=None, help="output directory (same as workdir=DIR)")
    p.add_argument("--no-eval", action="store_true", help="skip the final held-out / kernel evaluation")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true", help="per-device memory of a calibration step on the config's "
                   "mesh (model section = the drafter), nothing allocated; exit 2 if it does not fit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides; loss=X means calibrate.loss=X")
    return p.parse_intermixed_args(argv)


def _overrides(args) -> list[str]:
    out = [f"calibrate.{o}" if o.split("=", 1)[0] == "loss" else o for o in args.overrides]
    return out + ([f"workdir={args.workdir}"] if args.workdir is not None else [])


def resolve(cfg):
    """Fill the config from the base drafter and the dataset: model section = the init_from drafter's config,
    data.seq_len = prompt + completion length of the generated data. Returns (cfg, provenance)."""
    from specdiff_jax.calibration import check_drafter
    from specdiff_jax.config import ConfigError, ModelConfig
    from specdiff_jax.data import verifier_data as vd

    t = cfg.train
    if t.objective != "calibrate":
        raise ConfigError(f"train.objective={t.objective!r}: calibration runs need train.objective=calibrate "
                          "(configs/calibrate/*.yaml set it)")
    if not t.init_from:
        raise ConfigError("train.init_from is not set: calibration fine-tunes a pre-trained diffusion drafter; set "
                          "train.init_from=<model dir> (e.g. assets/tiny/drafter_base)")
    mc = Path(t.init_from) / "model_config.json"
    if not mc.is_file():
        raise ConfigError(f"train.init_from={t.init_from!r} is not a model directory (no model_config.json); point "
                          "it at a save_pretrained export such as assets/tiny/drafter_base")
    model = ModelConfig.load(mc)
    check_drafter(model)
    prov = vd.provenance(cfg.calibrate.data_dir)
    samp = prov.get("sampling", {})
    seq_len = int(samp.get("prompt_tokens", 0)) + int(samp.get("max_new_tokens", 0))
    if seq_len <= 1:
        raise ConfigError(f"the dataset at calibrate.data_dir={cfg.calibrate.data_dir!r} has no sampling provenance; "
                          "regenerate it with python -m train.generate_data")
    if seq_len > model.max_seq_len:
        raise ConfigError(f"the generated rows have {seq_len} tokens but the drafter's max_seq_len is "
                          f"{model.max_seq_len}; generate shorter prompts/completions")
    cfg = cfg.replace(model=model, data=dataclasses.replace(cfg.data, seq_len=seq_len))
    from specdiff_jax.configs import validate

    validate(cfg)
    return cfg, prov


def settings(cfg, max_new_tokens: int, verifier=None):
    """The static calibration settings of `cfg` for completions of at most `max_new_tokens` tokens."""
    from specdiff_jax.calibration import Settings, num_windows

    c, m = cfg.calibrate, cfg.model
    gamma = c.gamma or m.block_size
    return Settings(loss=c.loss, gamma=gamma, stride=c.stride, windows=num_windows(max_new_tokens, c.stride),
                    windows_per_row=c.windows_per_row, temperature=c.temperature,
                    verifier_temperature=c.verifier_temperature, mdlm_t_min=cfg.train.mdlm_t_min,
                    num_sampleable=m.num_sampleable, mask_id=m.mask_token_id,
                    verifier_exclude=(verifier.cfg.mask_token_id,) if verifier is not None
                    and verifier.cfg.mask_token_id is not None else ())


def load_verifier(path: str, drafter_cfg):
    from specdiff_jax.checkpoint import load_pretrained
    from specdiff_jax.config import ConfigError

    if not Path(path).exists():
        raise ConfigError(f"calibrate.verifier={path!r} does not exist; set it to the verifier's model directory")
    v = load_pretrained(path)
    if v.cfg.attention != "causal":
        raise ConfigError(f"calibrate.verifier={path!r} is {v.cfg.attention}; the verifier must be a causal LM")
    if v.cfg.num_sampleable != drafter_cfg.num_sampleable:
        raise ConfigError(f"drafter/verifier vocabulary mismatch: the drafter samples {drafter_cfg.num_sampleable} "
                          f"ids, the verifier {v.cfg.num_sampleable}; they must share one tokenizer")
    return v


def evaluate(drafter, verifier, cfg, s, prov, *, base=None, log=print) -> dict:
    """Held-out window statistics and the kernel measurement of `drafter` (and `base`, if given)."""
    from specdiff_jax.calibration import kernel_eval, window_stats
    from specdiff_jax.data import verifier_data as vd

    val = vd.load_completions(cfg.calibrate.data_dir, "validation")
    batches = vd.fixed_batches(val, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                               pad_id=cfg.model.pad_token_id or 0, max_batches=max(cfg.data.val_batches, 1))
    stat_s = dataclasses.replace(s, windows_per_row=0)
    out = {"windows": {}, "kernel": {}}
    models = {"calibrated": drafter, **({"base": base} if base is not None else {})}
    for name, m in models.items():
        out["windows"][name] = window_stats(m, batches, stat_s)
    if verifier is not None and cfg.calibrate.eval_prompts > 0:
        n = min(cfg.calibrate.eval_prompts, len(val))
        prompts = [val[i]["prompt"].tolist() for i in range(n)]
        max_new = min(cfg.calibrate.eval_max_new_tokens,
                      verifier.cfg.max_seq_len - max(len(p) for p in prompts) - s.gamma - 1)
        for name, m in models.items():
            t0 = time.perf_counter()
            out["kernel"][name] = kernel_eval(verifier, m, prompts, gamma=s.gamma, max_new_tokens=max_new,
                                              batch_size=min(8, n), eos_id=verifier.cfg.eos_token_id)
            out["kernel"][name]["seconds"] = round(time.perf_counter() - t0, 2)
    for name in models:
        w = out["windows"][name]
        k = out["kernel"].get(name)
        kt = f", kernel tokens/verifier call {k['tokens_per_verifier_call']:.3f}" if k else ""
        log(f"{name}: held-out expected streak {w['expected_streak']:.3f}, greedy streak {w['greedy_streak']:.3f}, "
            f"alpha_1 {w['alpha'][0]:.3f}{kt}")
    out["data"] = {"dataset": str(cfg.calibrate.data_dir), "provenance_run": prov.get("run_sha256")}
    return out


def run(cfg, *, evaluate_after: bool = True, log=print):
    """Calibrate per `cfg` (resumable). Returns (TrainResult, evaluation dict or None)."""
    from specdiff_jax import calibration as cal
    from specdiff_jax.checkpoint import load_pretrained
    from specdiff_jax.data import verifier_data as vd
    from specdiff_jax.training import train

    cfg, prov = resolve(cfg)
    need_v = cfg.calibrate.loss in ("kd_first", "kd_window")
    verifier = None
    if cfg.calibrate.verifier and (need_v or (evaluate_after and cfg.calibrate.eval_prompts > 0)):
        verifier = load_verifier(cfg.calibrate.verifier, cfg.model)
    s = settings(cfg, int(prov["sampling"]["max_new_tokens"]), verifier)
    objective = cal.make_objective(s, verifier if need_v else None)
    train_src = vd.load_completions(cfg.calibrate.data_dir, "train")
    import jax

    nproc = jax.process_count()
    train_ds = vd.calibration_dataset(train_src, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size // nproc,
                                      pad_id=cfg.model.pad_token_id or 0, seed=cfg.data.seed,
                                      shard_index=jax.process_index(), shard_count=nproc)
    val_batches = []
    if cfg.data.val_batches:
        try:
            val_src = vd.load_completions(cfg.calibrate.data_dir, "validation")
            val_batches = vd.fixed_batches(val_src, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                           pad_id=cfg.model.pad_token_id or 0, max_batches=cfg.data.val_batches)
        except ValueError:
            log("note: the dataset has no validation split: no held-out windows during training")
    result = train(cfg, cfg.workdir, train_data=train_ds, val_batches=val_batches, objective=objective)
    ev = None
    if evaluate_after and not val_batches:
        log("note: no held-out windows (data.val_batches=0 or no validation split): final evaluation skipped")
        evaluate_after = False
    if evaluate_after and result.status == "completed" and result.export and jax.process_index() == 0:
        drafter = load_pretrained(result.export)
        base = load_pretrained(cfg.train.init_from)
        ev = evaluate(drafter, verifier, cfg, s, prov, base=base, log=log)
        ev["loss"] = cfg.calibrate.loss
        ev["settings"] = dataclasses.asdict(s)
        ev["step"] = result.step
        (Path(cfg.workdir) / EVAL_FILE).write_text(json.dumps(ev, indent=2) + "\n")
    return result, ev


def main(argv=None) -> int:
    args = parse_args(argv)
    from specdiff_jax.config import ConfigError
    from specdiff_jax.configs import load_config, to_yaml

    try:
        cfg = load_config(args.config, _overrides(args))
        if args.print_config:
            print(to_yaml(resolve(cfg)[0]), end="")
            return 0
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from specdiff_jax.training import interrupted_message, run_program

    if args.dry_run:  # shapes only: the drafter's architecture comes from the config, no dataset is read
        from specdiff_jax.config import ModelConfig
        from specdiff_jax.dryrun import run as dry_run

        mc = Path(cfg.train.init_from or "") / "model_config.json"
        if cfg.train.init_from and mc.is_file():  # the drafter's own config when it exists (as resolve() does)
            cfg = cfg.replace(model=ModelConfig.load(mc))
        return run_program(lambda: dry_run(cfg, "train"))[0] or 0
    if not cfg.workdir:
        print("error: no work dir: pass --workdir DIR (or workdir=DIR)", file=sys.stderr)
        return 2

    def body():
        from specdiff_jax.distributed import initialize

        initialize(cfg.mesh)  # multi-process jobs (config keys or JAX_* environment); before any device use
        return run(cfg, evaluate_after=not args.no_eval)

    status, out = run_program(body)
    if status is not None:
        return status
    result, _ = out
    if result.status == "interrupted":
        print(interrupted_message(result))
        return 0
    val = f", held-out {cfg.calibrate.loss} loss {result.val['loss']:.4f}" if result.val else ""
    print(f"done: {result.step} steps{val}; model exported to {result.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
