"""The public front of decoding: `Decoder` (the core plus method="auto") and `generate`."""

from __future__ import annotations

from specdiff_jax.assets import embedded_candidates
from specdiff_jax.decode import core, planner
from specdiff_jax.decode.core import GenerateOutput


class Decoder(core.Decoder):
    __doc__ = core.Decoder.__doc__

    def _resolve_auto(self, prompts) -> None:
        """Ask the planner for the method and settings with the highest predicted tokens/s (docs/PLANNER.md).
        Without named drafters the candidates are the embedded ones for this temperature (assets/tiny/MANIFEST.json)
        when the verifier is the embedded verifier's architecture; otherwise only ar."""
        a = self._auto
        if not a["candidates"]:  # none named: the embedded drafter serving this temperature, when it fits
            a["candidates"] = embedded_candidates(self.verifier, self.temperature)
        plan = planner.plan(self.verifier, a["candidates"], prompts=a["plan_prompts"] or prompts, batch=len(prompts),
                            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                            max_new_tokens=self.max_new_tokens, eos_id=self.eos_id, cost_model=a["cost_model"],
                            max_gamma=a["gamma"], adaptive=a["adaptive"])
        self.cost_model = plan.cost_model
        self._configure(plan.method, plan.drafter, **plan.settings)
        self.plan, self._auto = plan, None


def generate(verifier, prompts, *, method: str, drafter=None, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, gamma: int = 16, num_drafts: int = 1, denoise_steps: int = 1,
             draft_temperature: float = 1.0, acceptance: str = "auto", eos_id: int | None = None,
             adaptive_gamma=False, seed: int = 0, mesh=None, rules=None) -> GenerateOutput:
    """Generate up to `max_new_tokens` ids per prompt with `method` in ar | sps | specdiff | specdiff2 | auto.

    verifier, drafter: `Transformer`s (e.g. from `load_pretrained`); for "auto" drafter may be a list of
    candidates. prompts: list of B token-id lists (ragged). temperature/top_k/top_p filter the verifier
    (0 = greedy); the drafter uses draft_temperature with the same top_k/top_p. gamma: draft length; num_drafts:
    K drafts (specdiff2: self-selection; specdiff: multi_draft); denoise_steps: T diffusion steps per draft.
    acceptance: auto | greedy | pq | delta | multi_draft (combinations that would not be lossless are refused).
    adaptive_gamma: True or a list of block sizes each round may choose from. eos_id: ends a row (None = the
    verifier config's eos_token_id). Returns GenerateOutput: tokens int32[B, max_new_tokens] (padded after each
    row's end), lengths int32[B] (tokens up to and including EOS), stats (verifier_calls, tokens_per_verifier_call,
    accepted_hist, alpha, ...). mesh, rules: run under this device mesh (parameters sharded by the logical axis
    rules, default the config's defaults; KV caches by cache_batch / kv_heads); None = the parameters' own placement.
    """
    dec = Decoder(verifier, drafter, method=method, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p, gamma=gamma, num_drafts=num_drafts, denoise_steps=denoise_steps,
                  draft_temperature=draft_temperature, acceptance=acceptance, eos_id=eos_id,
                  adaptive_gamma=adaptive_gamma, mesh=mesh, rules=rules)
    return dec(prompts, seed)
