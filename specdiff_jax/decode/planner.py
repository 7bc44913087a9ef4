"""method="auto": the decode setting with the highest predicted tokens/s on the hardware at hand.

predicted tokens/s = B * E[tokens per round] / t(round). The cost side comes from the cost model (`cost.py`), the
acceptance side from the drafter's acceptance profile: P(n >= j), the probability that a round accepts at least
j drafts, at the largest gamma considered. Drafting with a smaller gamma accepts the same prefix, so
E[tokens per round | gamma] = 1 + sum_{j <= gamma} P(n >= j) for every gamma up to the profiled one. Profiles are
measured on the fly (a short decode of the first prompts) and kept on disk beside the cost models, keyed by the
models' fingerprints, the setting and the temperature. `ar` is chosen when no speculative setting is predicted to
beat it. Every candidate is exactly lossless, so the choice only moves speed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from specdiff_jax.assets import pick_for_temperature
from specdiff_jax.decode import cost
from specdiff_jax.decode.core import Decoder

GAMMAS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
PROFILE_PROMPTS = 4
PROFILE_TOKENS = 64


@dataclasses.dataclass
class Plan:
    method: str
    drafter: object  # the chosen drafter model (None for ar)
    settings: dict  # keyword arguments of Decoder._configure
    predicted_tokens_per_s: float
    expected_tokens: float  # per row-round
    round_ms: float
    alpha: float  # per-token acceptance estimate at the chosen gamma (seeds adaptive gamma)
    cost_model: cost.CostModel | None = None  # the one the prediction came from (adaptive gamma's round costs)
    candidates: list = dataclasses.field(default_factory=list)  # every setting considered, with predictions
    source: str = ""

    def describe(self) -> dict:
        s = self.settings if self.method != "ar" else {}
        return {"method": self.method, "gamma": s.get("gamma"), "num_drafts": s.get("num_drafts"),
                "draft_temperature": s.get("draft_temperature"), "acceptance": s.get("acceptance"),
                "adaptive_gamma": list(s.get("adaptive_gamma") or []),
                "predicted_tokens_per_s": self.predicted_tokens_per_s, "expected_tokens": self.expected_tokens,
                "round_ms": self.round_ms, "cost_model": self.source}


def drafter_kind(model) -> str:
    a = model.cfg.attention
    return "ar" if a == "causal" else ("block" if a == "block_causal" else "bidir")


def options(kind: str, temperature: float) -> list[dict]:
    """The lossless settings worth profiling for a drafter of `kind` at verifier `temperature`."""
    if kind == "ar":
        return [dict(method="sps", num_drafts=1, draft_temperature=0.0 if temperature == 0 else temperature,
                     acceptance="auto")]
    if temperature == 0:
        return [dict(method="specdiff2", num_drafts=1, draft_temperature=0.0, acceptance="greedy"),
                dict(method="specdiff2", num_drafts=4, draft_temperature=1.0, acceptance="greedy")]
    return [dict(method="specdiff2", num_drafts=1, draft_temperature=temperature, acceptance="pq"),
            dict(method="specdiff2", num_drafts=4, draft_temperature=temperature, acceptance="delta"),
            dict(method="specdiff2", num_drafts=4, draft_temperature=temperature, acceptance="multi_draft")]


def _profile_path(verifier, drafter, opt: dict, temperature: float, gamma: int) -> Path:
    key = "_".join([cost.fingerprint(verifier), cost.fingerprint(drafter), opt["method"], f"k{opt['num_drafts']}",
                    f"dt{opt['draft_temperature']:g}", opt["acceptance"], f"t{temperature:g}", f"g{gamma}"])
    return cost.cache_dir() / "acceptance" / f"{key}.json"


def profile(verifier, drafter, opt: dict, prompts, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
            gamma: int, eos_id=None, use_cache: bool = True) -> list[float]:
    """P(n >= j) for j = 1..gamma: the per-round acceptance profile of one setting (measured, cached on disk)."""
    path = _profile_path(verifier, drafter, opt, temperature, gamma)
    if use_cache and path.is_file():
        try:
            return [float(x) for x in json.loads(path.read_text())["accept_rate"]]
        except (ValueError, KeyError, TypeError):
            pass
    dec = Decoder(verifier, drafter, method=opt["method"], gamma=gamma, num_drafts=opt["num_drafts"],
                  draft_temperature=opt["draft_temperature"], acceptance=opt["acceptance"], temperature=temperature,
                  top_k=top_k, top_p=top_p, max_new_tokens=PROFILE_TOKENS, eos_id=eos_id)
    out = dec([list(p)[-256:] for p in prompts[:PROFILE_PROMPTS]], seed=0)
    rate = [float(x) for x in out.stats["accept_rate"]]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"accept_rate": rate, "setting": opt, "temperature": temperature}))
    except OSError:
        pass
    return rate


def expected_tokens(rate, gamma: int) -> float:
    """E[tokens per round] drafting `gamma` tokens, from P(n >= j) measured at a gamma >= this one."""
    return 1.0 + float(np.sum(rate[:gamma]))


def choose(cm: cost.CostModel, profiles: list[tuple[dict, str, list[float]]], batch: int,
           max_gamma: int, new_tokens: int = 0) -> tuple[dict, list[dict]]:
    """The best (setting, gamma) of `profiles` [(option, drafter kind, P(n >= j))] and ar, and the full table.
    With `new_tokens`, each round also carries its share of the per-call cost of a decode that long."""
    share = (lambda e: cm.call_ms_per_round(new_tokens, e)) if new_tokens else (lambda e: 0.0)  # noqa: E731
    t_ar = cm.round_ms("none", 0) + share(1.0)
    table = [dict(method="ar", gamma=0, num_drafts=1, draft_temperature=None, acceptance="auto", kind="none",
                  expected_tokens=1.0, round_ms=t_ar, predicted_tokens_per_s=1e3 * batch / t_ar, index=-1)]
    for i, (opt, kind, rate) in enumerate(profiles):
        for g in (g for g in GAMMAS if g <= min(max_gamma, len(rate))):
            e = expected_tokens(rate, g)
            t = cm.round_ms(kind, g, opt["num_drafts"]) + share(e)
            table.append(dict(opt, gamma=g, kind=kind, expected_tokens=e, round_ms=t,
                              predicted_tokens_per_s=1e3 * batch * e / t, index=i))
    best = max(table, key=lambda r: r["predicted_tokens_per_s"])
    return best, table


def plan(verifier, candidates: list, *, prompts, temperature: float, top_k: int = 0, top_p: float = 1.0,
         max_new_tokens: int = 128, eos_id=None, cost_model: cost.CostModel | None = None,
         max_gamma: int = 16, adaptive: bool = False, batch: int | None = None) -> Plan:
    """Pick the method and settings for decoding batches of `batch` rows (default len(prompts)) with `verifier`
    and one of `candidates` (drafters); acceptance is measured on the first PROFILE_PROMPTS `prompts`. Of several
    candidates of one kind, the one tagged as serving the temperature nearest to `temperature` is profiled
    (`specdiff_jax.assets.tag`; untagged: the first)."""
    batch = batch or len(prompts)
    ctx = int(np.mean([len(p) for p in prompts])) + max_new_tokens // 2
    by_kind = {}
    for d in candidates:
        by_kind.setdefault(drafter_kind(d), []).append(d)
    # one drafter per kind: the one calibrated for this temperature when candidates say so (assets.tag)
    kinds = {k: pick_for_temperature(ds, temperature) for k, ds in by_kind.items()}
    cm = cost_model or cost.measure(verifier, kinds, batch=batch, ctx=ctx)
    profiles, models = [], []
    for kind, d in kinds.items():
        for opt in options(kind, temperature):
            rate = profile(verifier, d, opt, prompts, temperature=temperature, top_k=top_k, top_p=top_p,
                           gamma=max_gamma, eos_id=eos_id)
            profiles.append((opt, kind, rate))
            models.append(d)
    best, table = choose(cm, profiles, batch, max_gamma, max_new_tokens)
    if best["method"] == "ar":
        settings = dict(gamma=1, num_drafts=1, denoise_steps=1, draft_temperature=0.0, acceptance="auto",
                        adaptive_gamma=False)
        return Plan("ar", None, settings, best["predicted_tokens_per_s"], 1.0, best["round_ms"], 0.0,
                    cost_model=cm, candidates=table, source=cm.source)
    opt, kind, rate = profiles[best["index"]]
    g = best["gamma"]
    judged = 1.0 + sum(rate[: g - 1])  # position j is judged when j-1 drafts were accepted
    alpha = float(sum(rate[:g]) / max(judged, 1e-9))
    gammas = ()
    if adaptive:
        gammas = tuple(sorted({x for x in (max(1, g // 2), g, min(2 * g, max_gamma, len(rate))) if x >= 1}))
    settings = dict(gamma=max(gammas) if gammas else g, num_drafts=opt["num_drafts"], denoise_steps=1,
                    draft_temperature=opt["draft_temperature"], acceptance=opt["acceptance"],
                    adaptive_gamma=gammas or False)
    return Plan(opt["method"], models[best["index"]], settings, best["predicted_tokens_per_s"],
                best["expected_tokens"], best["round_ms"], alpha, cm, table, cm.source)
