"""Evaluating calibrated drafters: held-out window statistics and the decode kernel's acceptance (docs/METHOD.md §7).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specdiff_jax.calibration.losses import streak_prefix_probs
from specdiff_jax.calibration.windows import Settings, window_forward
from specdiff_jax.data import verifier_data as vd
from specdiff_jax.decode import Decoder, acceptance_stats


@functools.lru_cache(maxsize=8)
def _stats_fn(s: Settings, graphdef):
    def f(state, tokens, seg):
        w = window_forward(dataclasses.replace(s, loss="streak", windows_per_row=0), nnx.merge(graphdef, state),
                           tokens, seg)
        a = streak_prefix_probs(w["lq"], w["valid"])
        prev = jnp.concatenate([jnp.where(w["valid"][:, :1], 1.0, 0.0), a[:, :-1]], -1) * w["valid"]
        run = jnp.cumprod((w["greedy_match"] & w["valid"]).astype(jnp.int32), axis=-1).sum(-1)
        nw = w["valid"].any(-1)
        return {"a_sum": a.sum(0), "prev_sum": prev.sum(0), "streak_sum": jnp.where(nw, a.sum(-1), 0).sum(),
                "greedy_sum": jnp.where(nw, run, 0).sum(), "windows": nw.sum()}
    return jax.jit(f)


def window_stats(drafter, batches, s: Settings) -> dict:
    """Expected streak, greedy streak and alpha_j (list of G floats) over all windows of `batches`
    (iterable of {"tokens", "segment_ids"} numpy arrays)."""
    gd, state = nnx.split(drafter)
    fn = _stats_fn(s, gd)
    tot = None
    for b in batches:
        r = jax.device_get(fn(state, jnp.asarray(b["tokens"]), jnp.asarray(b["segment_ids"])))
        tot = r if tot is None else {k: tot[k] + r[k] for k in r}
    if tot is None:
        raise ValueError("window_stats: no batches given")
    n = max(int(tot["windows"]), 1)
    return {"expected_streak": float(tot["streak_sum"]) / n, "greedy_streak": float(tot["greedy_sum"]) / n,
            "alpha": (np.asarray(tot["a_sum"]) / np.maximum(np.asarray(tot["prev_sum"]), 1e-30)).tolist(),
            "windows": int(tot["windows"])}


def kernel_eval(verifier, drafter, prompts: list[list[int]], *, gamma: int, max_new_tokens: int,
                batch_size: int = 8, draft_temperature: float = 0.0, eos_id: int | None = None,
                method: str = "specdiff", draft_window: int = 512, temperature: float = 0.0,
                seed: int = 0) -> dict:
    """Run the decode kernel with `drafter` on `prompts` and aggregate its statistics (`decode_statistics`).
    At verifier `temperature` 0 (the default) the output equals the verifier's own greedy decoding, so every
    drafter is judged on the same token sequences; at T > 0 each drafter is judged on its own lossless samples
    (batch i draws with seed `seed + i`)."""
    if not prompts:
        raise ValueError("kernel_eval: no prompts")
    dec = Decoder(verifier, drafter, method=method, max_new_tokens=max_new_tokens, temperature=temperature, gamma=gamma,
                  draft_temperature=draft_temperature, eos_id=eos_id, draft_window=draft_window)
    hist = np.zeros(gamma + 1, np.int64)
    acc = np.zeros(gamma, np.int64)
    row_tokens, row_rounds = [], []
    for i in range(0, len(prompts), batch_size):
        out = dec(prompts[i: i + batch_size], seed=seed + i)
        st = out.stats
        hist += np.asarray(st["accepted_hist"], np.int64)
        acc += np.asarray(st["accept_counts"], np.int64)
        n = len(prompts[i: i + batch_size])
        row_tokens += np.asarray(out.lengths)[:n].astype(int).tolist()
        row_rounds += [int(r) for r in st["row_verifier_calls"][:n]]
    return {**decode_statistics(hist, acc, row_tokens, row_rounds), "prompts": len(prompts), "gamma": gamma,
            "draft_temperature": draft_temperature, "verifier_temperature": temperature}


def decode_statistics(hist, accept_counts, row_tokens: list[int], row_rounds: list[int]) -> dict:
    """The decode package's acceptance statistics (`decode.acceptance_stats`: tau, alpha_j, reach, accept_rate,
    mean accepted length, histogram) of counts summed over decode calls, plus the per-prompt counts (for
    confidence intervals over prompts)."""
    tokens, rounds = sum(row_tokens), sum(row_rounds)
    return {**acceptance_stats(hist, accept_counts, tokens=tokens, row_rounds=rounds), "tokens": int(tokens),
            "verifier_calls": int(rounds), "row_tokens": row_tokens, "row_verifier_calls": row_rounds}


def evaluate(drafter, verifier, cfg, s, prov, *, base=None, log=print) -> dict:
    """Held-out window statistics and the kernel measurement of `drafter` (and `base`, if given)."""
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
                                              batch_size=min(8, n), eos_id=verifier.cfg.eos_token_id,
                                              draft_window=s.draft_window)
            out["kernel"][name]["seconds"] = round(time.perf_counter() - t0, 2)
    for name in models:
        w = out["windows"][name]
        k = out["kernel"].get(name)
        kt = f", kernel tokens/verifier call {k['tokens_per_verifier_call']:.3f}" if k else ""
        log(f"{name}: held-out expected streak {w['expected_streak']:.3f}, greedy streak {w['greedy_streak']:.3f}, "
            f"alpha_1 {w['alpha'][0]:.3f}{kt}")
    out["data"] = {"dataset": str(cfg.calibrate.data_dir), "provenance_run": prov.get("run_sha256")}
    return out
