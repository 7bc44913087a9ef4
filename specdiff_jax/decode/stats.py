"""Acceptance statistics of speculative decoding, computed in one place for the decoder, calibration and the
benchmark (docs/METHOD.md, metrics).

From the counts the kernel keeps (summed over any number of calls):
  hist[n]          row-rounds that accepted exactly n drafts (n = 0..gamma)
  accept_counts[j] row-rounds whose draft position j+1 was accepted
  tokens           emitted tokens; row_rounds: verifier rounds summed over rows
it derives tau (tokens per verifier call), the mean accepted length, alpha_j (acceptance of position j given
1..j-1 accepted; None where no round reached j) and accept_rate_j (P(position j accepted) per round).
"""

from __future__ import annotations

import numpy as np


def acceptance_stats(hist, accept_counts, *, tokens: int, row_rounds: int) -> dict:
    """The acceptance summary of summed kernel counts (see the module docstring).

    Under adaptive gamma a round that drafted fewer than the largest gamma and accepted all of them counts as
    reaching the next position too, so alpha_j at j above the smallest gamma is a lower bound there.
    """
    hist = np.asarray(hist, np.int64)
    G = len(hist) - 1
    acc = np.asarray(accept_counts, np.int64)[:G]
    rounds = int(hist.sum())
    reach = np.array([hist[j:].sum() for j in range(G)], np.int64)  # rounds in which draft j+1 was judged
    return {
        "tokens_per_verifier_call": float(tokens) / max(int(row_rounds), 1),
        "mean_accepted": float(np.dot(np.arange(G + 1), hist)) / max(rounds, 1),
        "alpha": [float(a) / r if r else None for a, r in zip(acc, reach)],
        "accept_rate": (acc / max(rounds, 1)).tolist(),
        "reach": reach.tolist(),
        "accepted_hist": hist.tolist(),
        "accept_counts": acc.tolist(),
    }
