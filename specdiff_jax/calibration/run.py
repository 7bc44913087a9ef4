"""A calibration run (docs/METHOD.md §6): the config completed from the base drafter and the dataset, the data,
the objective, the training loop, and the evaluation of the export. `python -m train.calibrate` is its program.
"""

from __future__ import annotations

import dataclasses

import jax
from etils import epath

from specdiff_jax import rundir
from specdiff_jax.calibration.evaluation import evaluate
from specdiff_jax.calibration.objective import make_objective
from specdiff_jax.calibration.windows import Settings, check_drafter, num_windows
from specdiff_jax.config import ConfigError, ModelConfig, check_verifier
from specdiff_jax.config.run import validate
from specdiff_jax.hf_checkpoint import load_pretrained
from specdiff_jax.data import verifier_data as vd
from specdiff_jax.data.sharded import ShardedStream
from specdiff_jax.training import train

EVAL_FILE = "calibration_eval.json"


def resolve(cfg):
    """Fill the config from the base drafter and the dataset: model section = the init_from drafter's config,
    data.seq_len = prompt + completion length of the generated data. Returns (cfg, provenance)."""
    t = cfg.train
    if t.objective != "calibrate":
        raise ConfigError(f"train.objective={t.objective!r}: calibration runs need train.objective=calibrate "
                          "(configs/calibrate/*.yaml set it)")
    if not t.init_from:
        raise ConfigError("train.init_from is not set: calibration fine-tunes a pre-trained diffusion drafter; set "
                          "train.init_from=<model dir> (e.g. assets/tiny/drafter_base)")
    mc = epath.Path(t.init_from) / "model_config.json"
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
    validate(cfg)
    return cfg, prov


def settings(cfg, max_new_tokens: int, verifier=None):
    """The static calibration settings of `cfg` for completions of at most `max_new_tokens` tokens."""
    c, m = cfg.calibrate, cfg.model
    gamma = c.gamma or m.block_size
    return Settings(loss=c.loss, gamma=gamma, stride=c.stride, windows=num_windows(max_new_tokens, c.stride),
                    windows_per_row=c.windows_per_row, temperature=c.temperature,
                    verifier_temperature=c.verifier_temperature, mdlm_t_min=cfg.train.mdlm_t_min,
                    num_sampleable=m.num_sampleable, mask_id=m.mask_token_id, draft_window=c.draft_window,
                    pad_id=m.pad_token_id or 0, vocab_chunk=cfg.train.vocab_chunk, verifier_exclude=(verifier.cfg.mask_token_id,) if verifier is not None
                    and verifier.cfg.mask_token_id is not None else ())


def load_verifier(path: str, drafter_cfg):
    """The verifier at calibrate.verifier=`path`, checked against the drafter's config."""
    if not epath.Path(path).exists():
        raise ConfigError(f"calibrate.verifier={path!r} does not exist; set it to the verifier's model directory")
    v = load_pretrained(path)
    check_verifier(v.cfg, f"calibrate.verifier={path!r}", drafter=drafter_cfg)
    return v


def training_stream(cfg, source, *, process_index: int | None = None, process_count: int | None = None):
    """The calibration rows as data.num_shards disjoint shards (0 = one per process), this process's part: as in
    pre-training (specdiff_jax.data.sharded), the global batches do not depend on the process count, so a run
    resumes on any process count dividing num_shards with exactly the batches it would have seen."""
    d = cfg.data
    n = jax.process_count() if process_count is None else process_count
    pid = jax.process_index() if process_index is None else process_index
    return ShardedStream(
        lambda i, s, bs: vd.calibration_dataset(source, seq_len=d.seq_len, batch_size=bs,
                                                pad_id=cfg.model.pad_token_id or 0, seed=d.seed, shard_index=i,
                                                shard_count=s),
        num_shards=d.num_shards or n, batch_size=d.batch_size, process_index=pid, process_count=n)


def run(cfg, *, evaluate_after: bool = True, log=print):
    """Calibrate per `cfg` (resumable). Returns (TrainResult, evaluation dict or None)."""
    cfg, prov = resolve(cfg)
    need_v = cfg.calibrate.loss in ("kd_first", "kd_window")
    verifier = None
    if cfg.calibrate.verifier and (need_v or (evaluate_after and cfg.calibrate.eval_prompts > 0)):
        verifier = load_verifier(cfg.calibrate.verifier, cfg.model)
    s = settings(cfg, int(prov["sampling"]["max_new_tokens"]), verifier)
    objective = make_objective(s, verifier if need_v else None)
    train_ds = training_stream(cfg, vd.load_completions(cfg.calibrate.data_dir, "train"))
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
        rundir.write_json(cfg.workdir, EVAL_FILE, ev)
    return result, ev
