"""Speculative decoding: the draft-verify kernel and its front (docs/METHOD.md).

    api.py       Decoder / generate / GenerateOutput: validation, buckets, the compiled-kernel cache, `auto`
    kernel.py    the one `lax.while_loop`: draft -> verify -> select -> accept -> commit, adaptive gamma
    drafters/    one Drafter implementation per kind: block-causal, bidirectional, AR, none
    spec.py      KernelSpec (everything static about a kernel) and shared array helpers
    stats.py     tau, alpha_j, accepted-length histograms (shared with calibration and the benchmark)
    cost.py      the measured / analytic cost model of a verifier-drafter pair on a device
    planner.py   method="auto": the setting with the highest predicted tokens/s
"""

from specdiff_jax.decode.api import (DRAFTER_METHODS, MAX_DRAFTS, MAX_GAMMA, METHODS, DecodeError, Decoder,
                                     GenerateOutput, generate)
from specdiff_jax.decode.kernel import EXTRA_RULES, TRACES
from specdiff_jax.decode.stats import acceptance_stats

__all__ = ["DRAFTER_METHODS", "EXTRA_RULES", "MAX_DRAFTS", "MAX_GAMMA", "METHODS", "TRACES", "DecodeError",
           "Decoder", "GenerateOutput", "acceptance_stats", "generate"]
