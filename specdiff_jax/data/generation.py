"""Sampling calibration data from the verifier (docs/METHOD.md §6): completions of corpus-train prompts that
overlap no evaluation prompt, saved batch by batch (a rerun continues where it stopped) and written as a TFDS
dataset with its provenance. `python -m train.generate_data` is its program.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from specdiff_jax.config import ConfigError, check_verifier
from specdiff_jax.hf_checkpoint import load_pretrained
from specdiff_jax.data import corpus
from specdiff_jax.data import verifier_data as vd
from specdiff_jax.decode import Decoder
from specdiff_jax.tokenizer import load_tokenizer

WORK = "_work"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def params_sha256(model) -> str:
    """Fingerprint of a model's parameter values (sha256 over the arrays in path order)."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
                             key=lambda x: jax.tree_util.keystr(x[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_verifier(path: str, tokenizer):
    if not Path(path).exists():
        raise FileNotFoundError(f"verifier {path!r} does not exist; set generate.verifier to a model directory "
                                "(train one with python -m train.pretrain --config configs/models/tiny_verifier.yaml)")
    v = load_pretrained(path)
    check_verifier(v.cfg, f"generate.verifier={path!r}", tokenizer_vocab=tokenizer.vocab_size)
    return v


def build_prompts(cfg, tokenizer):
    """(prompts, counts) for the run: corpus-train snippets or the prompts file, checked against the eval set."""
    g = cfg.generate
    evals = vd.eval_set(cfg.data.data_dir, humaneval=True, extra_files=g.eval_files)
    if g.prompts_file:
        prompts = vd.prompts_from_file(g.prompts_file, tokenizer, evals, prompt_tokens=g.prompt_tokens)
        counts = {"tried": len(prompts), "skipped_overlap": 0, "skipped_short": 0}
    else:
        train_src = corpus.load_split(cfg.data.data_dir, "train")
        prompts, counts = vd.sample_prompts(train_src, tokenizer, evals, num_prompts=g.num_prompts,
                                            prompt_tokens=g.prompt_tokens, seed=g.seed, on_overlap=g.on_overlap)
    # Independent final check of what will be emitted.
    vd.assert_disjoint([tokenizer.decode(p.ids) for p in prompts], evals)
    counts["eval_texts"] = len(evals.texts)
    return prompts, counts


def generate(cfg, *, verifier=None, tokenizer=None, log=print) -> Path:
    """Run the generation of `cfg` (resumable); returns the dataset directory."""
    g = cfg.generate
    tokenizer = tokenizer or load_tokenizer(cfg.data.tokenizer)
    verifier = verifier or load_verifier(g.verifier, tokenizer)
    need = g.prompt_tokens + g.max_new_tokens
    if need > verifier.cfg.max_seq_len:
        raise ConfigError(f"generate.prompt_tokens + generate.max_new_tokens = {need} exceeds the verifier's "
                          f"max_seq_len={verifier.cfg.max_seq_len}; lower one of them")
    out = Path(g.out_dir)
    work = out / WORK
    settings = {k: v for k, v in dataclasses.asdict(g).items() if k not in ("progress_bar", "out_dir")}
    vinfo = {"path": str(Path(g.verifier).resolve()), "config_sha256": _sha(verifier.cfg.to_dict()),
             "params_sha256": params_sha256(verifier)}
    run_hash = _sha({"settings": settings, "verifier": vinfo, "corpus": str(Path(cfg.data.data_dir).resolve()),
                     "tokenizer": str(Path(cfg.data.tokenizer).resolve())})
    _claim_work_dir(work, run_hash, settings, vinfo)

    t0 = time.perf_counter()
    prompts, counts = build_prompts(cfg, tokenizer)
    log(f"{len(prompts)} prompts ({counts['skipped_overlap']} sampled snippets overlapped the evaluation set and were "
        f"skipped) in {time.perf_counter() - t0:.1f}s")
    rows = [(i, s) for i in range(len(prompts)) for s in range(g.samples_per_prompt)]
    n_batches = -(-len(rows) // g.batch_size)
    t_gen = _sample_chunks(g, verifier, tokenizer, prompts, rows, work, mesh=decode_mesh(cfg))
    records = _records(prompts, n_batches, work, vd.assign_splits(len(prompts), g.validation_fraction))
    lengths = np.asarray([len(r["completion"]) for r in records])
    prov = {
        "verifier": vinfo, "sampling": {k: settings[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens",
                                                                 "samples_per_prompt", "prompt_tokens")},
        "seed": g.seed, "generate_config": settings, "config_sha256": _sha(settings), "run_sha256": run_hash,
        "corpus": {"data_dir": str(Path(cfg.data.data_dir).resolve()), "split": "train"},
        "tokenizer": str(Path(cfg.data.tokenizer).resolve()), "prompts": counts, "num_prompts": len(prompts),
        "num_samples": len(records), "mean_completion_tokens": float(lengths.mean()) if len(lengths) else 0.0,
        "ended_with_eos": int(sum(1 for r in records if r["completion"] and r["completion"][-1] == tokenizer.eos_id)),
        "git_commit": _git_commit(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "generate_seconds": round(t_gen, 2),
    }
    ds = vd.write_dataset(out, records, prov)
    log(f"wrote {len(records)} completions ({int(lengths.sum())} tokens, mean {prov['mean_completion_tokens']:.1f}) "
        f"to {ds}")
    return ds


def _claim_work_dir(work: Path, run_hash: str, settings: dict, vinfo: dict) -> None:
    """Record this generation in work/run.json, or refuse a work dir that holds another one."""
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / "run.json"
    if state_file.exists():
        old = json.loads(state_file.read_text())
        if old.get("run_hash") != run_hash:
            raise ConfigError(f"{str(work)!r} holds a generation with other settings or another verifier; use another "
                              f"generate.out_dir or delete {str(work)!r} to start over")
    else:
        state_file.write_text(json.dumps({"run_hash": run_hash, "settings": settings, "verifier": vinfo}, indent=2))


def decode_mesh(cfg):
    """The mesh the verifier decodes on: the run's `mesh` section over every device when there is more than one
    (the verifier's parameters split by their logical axes, as the data-generation dry run plans), else None."""
    if jax.device_count() == 1:
        return None
    from specdiff_jax import sharding as shd

    return shd.make_mesh(cfg.mesh)


def _sample_chunks(g, verifier, tokenizer, prompts, rows: list[tuple[int, int]], work: Path, mesh=None) -> float:
    """Sample every (prompt, sample) row in batches, each saved at once as work/chunk_<b>.npz (a finished chunk
    is skipped on a rerun). Returns the seconds spent decoding. `mesh`: decode sharded over it."""
    B = g.batch_size
    n_batches = -(-len(rows) // B)
    dec = Decoder(verifier, method="ar", max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                  top_p=g.top_p, eos_id=tokenizer.eos_id, mesh=mesh)
    done = {int(p.stem.split("_")[1]) for p in work.glob("chunk_*.npz")}
    bar = None
    if g.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=n_batches, initial=len(done & set(range(n_batches))), desc="generate", dynamic_ncols=True)
    t_gen, n_tok = 0.0, 0
    try:
        for b in range(n_batches):
            if b in done:
                continue
            chunk = rows[b * B: (b + 1) * B]
            batch = [list(prompts[i].ids) for i, _ in chunk]
            batch += [batch[0]] * (B - len(batch))  # one compiled shape: pad the last batch
            t1 = time.perf_counter()
            res = dec(batch, seed=int(np.random.SeedSequence([g.seed, b]).generate_state(1)[0] % (2**31)))
            t_gen += time.perf_counter() - t1
            n = len(chunk)
            n_tok += int(res.lengths[:n].sum())
            tmp = work / f"chunk_{b:06d}.tmp.npz"
            np.savez(tmp, prompt_index=np.asarray([i for i, _ in chunk]), sample_index=np.asarray([s for _, s in chunk]),
                     tokens=res.tokens[:n], lengths=res.lengths[:n])
            tmp.rename(work / f"chunk_{b:06d}.npz")  # atomic: a chunk file is complete or absent
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tok_s=f"{n_tok / max(t_gen, 1e-9):,.0f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return t_gen


def _records(prompts, n_batches: int, work: Path, splits) -> list[dict]:
    """The dataset records of all saved chunks, in order."""
    records = []
    for b in range(n_batches):
        z = np.load(work / f"chunk_{b:06d}.npz")
        for pi, si, toks, ln in zip(z["prompt_index"], z["sample_index"], z["tokens"], z["lengths"]):
            p = prompts[int(pi)]
            records.append({"prompt": list(p.ids), "completion": toks[: int(ln)].tolist(), "prompt_index": int(pi),
                            "sample_index": int(si), "source": p.source, "split": splits[int(pi)]})
    return records
