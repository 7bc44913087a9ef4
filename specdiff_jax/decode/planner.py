"""method="auto": the decode setting with the highest predicted tokens/s on the hardware at hand.

predicted tokens/s = B * E[tokens per round] / t(round). The cost side comes from the cost model (`cost.py`), the
acceptance side from the drafter's acceptance profile: P(n >= j), the probability that a round accepts at least
j drafts, at the largest gamma considered. Drafting with a smaller gamma accepts the same prefix, so
E[tokens per round | gamma] = 1 + sum_{j <= gamma} P(n >= j) for every gamma up to the profiled one. Profiles are
measured on the fly (a short decode of the first prompts) and kept on disk beside the cost models, keyed by the
models' fingerprints, the setting and the temperature.

Speculation is chosen only when it pays beyond the planner's own uncertainty: its gain over `ar` computed with a
lower confidence bound on E[tokens per round] (the profile was measured on few rounds) must exceed the cost
model's measured relative error (`CostModel.error`). Otherwise `ar`, and `Plan.reason` says why. Every candidate
is exactly lossless, so the choice only moves speed.
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
PROFILE_VERSION = "a2"  # bump whenever what a cached acceptance profile records changes
Z_LOWER = 1.645  # one-sided 95% normal quantile of the lower bound on E[tokens per round]


class Rates(list):
    """P(n >= j) for j = 1..gamma, and `rounds`: how many row-rounds it was measured on (None: unknown, then no
    acceptance bound is taken)."""

    rounds: int | None = None

    def __init__(self, values, rounds: int | None = None):
        super().__init__(float(x) for x in values)
        self.rounds = rounds


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
    reason: str = ""  # why this choice: its predicted gain, its lower bound, the margin it had to clear

    def describe(self) -> dict:
        s = self.settings if self.method != "ar" else {}
        return {"method": self.method, "gamma": s.get("gamma"), "num_drafts": s.get("num_drafts"),
                "draft_temperature": s.get("draft_temperature"), "acceptance": s.get("acceptance"),
                "adaptive_gamma": list(s.get("adaptive_gamma") or []),
                "predicted_tokens_per_s": self.predicted_tokens_per_s, "expected_tokens": self.expected_tokens,
                "round_ms": self.round_ms, "cost_model": self.source, "reason": self.reason}


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
    key = "_".join([PROFILE_VERSION, cost.fingerprint(verifier), cost.fingerprint(drafter), opt["method"],
                    f"k{opt['num_drafts']}",
                    f"dt{opt['draft_temperature']:g}", opt["acceptance"], f"t{temperature:g}", f"g{gamma}"])
    return cost.cache_dir() / "acceptance" / f"{key}.json"


def profile(verifier, drafter, opt: dict, prompts, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
            gamma: int, eos_id=None, use_cache: bool = True) -> Rates:
    """P(n >= j) for j = 1..gamma: the per-round acceptance profile of one setting (measured, cached on disk), with
    the number of row-rounds it was measured on."""
    path = _profile_path(verifier, drafter, opt, temperature, gamma)
    if use_cache and path.is_file():
        try:
            d = json.loads(path.read_text())
            return Rates(d["accept_rate"], int(d["rounds"]))
        except (ValueError, KeyError, TypeError):
            pass
    dec = Decoder(verifier, drafter, method=opt["method"], gamma=gamma, num_drafts=opt["num_drafts"],
                  draft_temperature=opt["draft_temperature"], acceptance=opt["acceptance"], temperature=temperature,
                  top_k=top_k, top_p=top_p, max_new_tokens=PROFILE_TOKENS, eos_id=eos_id)
    out = dec([list(p)[-256:] for p in prompts[:PROFILE_PROMPTS]], seed=0)
    rate = Rates(out.stats["accept_rate"], int(np.sum(out.stats["accepted_hist"])))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"accept_rate": list(rate), "rounds": rate.rounds, "setting": opt,
                                    "temperature": temperature}))
    except OSError:
        pass
    return rate


def expected_tokens(rate, gamma: int) -> float:
    """E[tokens per round] drafting `gamma` tokens, from P(n >= j) measured at a gamma >= this one."""
    return 1.0 + float(np.sum(rate[:gamma]))


def expected_tokens_low(rate, gamma: int, rounds: int | None, z: float = Z_LOWER) -> float:
    """A lower confidence bound on E[tokens per round] at `gamma`: the mean less z standard errors over `rounds`
    measured rounds. A round emits 1 + min(n, gamma) tokens; with r_j = P(n >= j),
    E[min(n, gamma)^2] = sum_{j <= gamma} (2j - 1) r_j gives its variance from the profile alone."""
    mean = expected_tokens(rate, gamma)
    if not rounds:
        return mean
    r = np.asarray(rate[:gamma], float)
    var = float(np.sum((2 * np.arange(1, len(r) + 1) - 1) * r) - np.sum(r) ** 2)
    return max(1.0, mean - z * np.sqrt(max(var, 0.0) / rounds))


def _describe(row: dict) -> str:
    return (f"{row['method']} gamma {row['gamma']} K {row['num_drafts']} draft T {row['draft_temperature']:g} "
            f"{row['acceptance']}")


def choose(cm: cost.CostModel, profiles: list[tuple], batch: int, max_gamma: int, new_tokens: int = 0,
           temperature: float = 0.0, margin: float | None = None) -> tuple[dict, list[dict]]:
    """The best (setting, gamma) of `profiles` [(option, drafter kind, P(n >= j))] and ar, and the full table.

    A speculative setting is eligible only when its gain over ar with the acceptance lower bound
    (`expected_tokens_low`, over the profile's `rounds`) exceeds `margin` (default: the cost model's measured
    relative error); the eligible one with the highest predicted tokens/s wins, else ar. `best["reason"]` says
    which and why. With `new_tokens`, each round also carries its share of the per-call cost of a decode that long.
    """
    margin = cm.error if margin is None else margin
    share = (lambda e: cm.call_ms_per_round(new_tokens, e)) if new_tokens else (lambda e: 0.0)  # noqa: E731
    t_ar = cm.round_ms("none", 0, temperature=temperature) + share(1.0)
    ar_tps = 1e3 * batch / t_ar
    table = [dict(method="ar", gamma=0, num_drafts=1, draft_temperature=None, acceptance="auto", kind="none",
                  expected_tokens=1.0, round_ms=t_ar, predicted_tokens_per_s=ar_tps, gain=0.0, gain_low=0.0,
                  index=-1)]
    for i, (opt, kind, rate) in enumerate(profiles):
        for g in (g for g in GAMMAS if g <= min(max_gamma, len(rate))):
            e = expected_tokens(rate, g)
            e_low = expected_tokens_low(rate, g, getattr(rate, "rounds", None))
            t = cm.round_ms(kind, g, opt["num_drafts"], temperature=temperature,
                            draft_temperature=opt["draft_temperature"]) + share(e)
            tps = 1e3 * batch * e / t
            table.append(dict(opt, gamma=g, kind=kind, expected_tokens=e, expected_tokens_low=e_low, round_ms=t,
                              predicted_tokens_per_s=tps, gain=tps / ar_tps - 1.0,
                              gain_low=1e3 * batch * e_low / t / ar_tps - 1.0, index=i))
    spec = [r for r in table if r["method"] != "ar"]
    eligible = [r for r in spec if r["gain_low"] > margin]
    if eligible:
        best = dict(max(eligible, key=lambda r: r["predicted_tokens_per_s"]))
        best["reason"] = (f"predicted {best['gain']:+.0%} over ar (acceptance lower bound {best['gain_low']:+.0%}) "
                          f"> margin {margin:.0%}")
    else:
        best = dict(table[0])
        top = max(spec, key=lambda r: r["predicted_tokens_per_s"]) if spec else None
        best["reason"] = "no speculative candidate" if top is None else (
            f"best speculative setting {_describe(top)} predicted {top['gain']:+.0%} (acceptance lower bound "
            f"{top['gain_low']:+.0%}) < margin {margin:.0%}")
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
    best, table = choose(cm, profiles, batch, max_gamma, max_new_tokens, temperature=temperature)
    if best["method"] == "ar":
        settings = dict(gamma=1, num_drafts=1, denoise_steps=1, draft_temperature=0.0, acceptance="auto",
                        adaptive_gamma=False)
        return Plan("ar", None, settings, best["predicted_tokens_per_s"], 1.0, best["round_ms"], 0.0,
                    cost_model=cm, candidates=table, source=cm.source, reason=best["reason"])
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
                best["expected_tokens"], best["round_ms"], alpha, cm, table, cm.source, best["reason"])
