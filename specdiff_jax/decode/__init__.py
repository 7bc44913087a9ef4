"""Speculative decoding: the draft-verify kernel and its front (docs/METHOD.md).

    api.py       the public Decoder (core + method="auto") and generate
    core.py      the decoder core: validation, buckets, compiled kernels, GenerateOutput
    kernel.py    the one `lax.while_loop`: draft -> verify -> select -> accept -> commit, adaptive gamma
    drafters/    one Drafter implementation per kind: block-causal, bidirectional, AR, none
    spec.py      KernelSpec (everything static about a kernel) and shared array helpers
    stats.py     tau, alpha_j, accepted-length histograms (shared with calibration and the benchmark)
    cost.py      the measured / analytic cost model of a verifier-drafter pair on a device
    planner.py   method="auto": the setting with the highest predicted tokens/s
"""

from specdiff_jax.decode.api import Decoder, generate
from specdiff_jax.decode.core import DRAFTER_METHODS, MAX_DRAFTS, MAX_GAMMA, METHODS, DecodeError, GenerateOutput
from specdiff_jax.decode.kernel import EXTRA_RULES, TRACES
from specdiff_jax.decode.stats import acceptance_stats

__all__ = ["DRAFTER_METHODS", "EXTRA_RULES", "MAX_DRAFTS", "MAX_GAMMA", "METHODS", "TRACES", "DecodeError",
           "Decoder", "GenerateOutput", "acceptance_stats", "generate"]
