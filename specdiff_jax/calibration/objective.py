"""The calibration objective plugged into the training loop (docs/METHOD.md §6)."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from specdiff_jax.calibration.losses import (acceptance_stats, ce_streak_loss, kd_first_loss, kd_window_loss,
                                             mdlm_window_loss, streak_loss)
from specdiff_jax.calibration.windows import Settings, window_forward
from specdiff_jax.config import ConfigError
from specdiff_jax.objectives import Objective

Array = jax.Array


def loss_from_windows(s: Settings, w: dict) -> Array:
    if s.loss == "streak":
        return streak_loss(w["lq"], w["valid"])
    if s.loss == "ce_streak":
        return ce_streak_loss(w["lq"], w["valid"])
    if s.loss == "kd_first":
        return kd_first_loss(w["p"], w["logq"], w["valid"])
    if s.loss == "kd_window":
        return kd_window_loss(w["p"], w["logq"], w["valid"])
    return mdlm_window_loss(w["lq_noisy"], w["masked"], w["t"], w["valid"])


def calibration_loss(s: Settings, drafter, batch: dict, rng: Array, verifier=None) -> tuple[Array, dict]:
    """`(loss, metrics)` of one batch. metrics: loss, tokens (valid windows, the averaging weight),
    expected_streak, greedy_streak, alpha_1, alpha_mid (j = G/2), alpha_last."""
    w = window_forward(s, drafter, batch["tokens"], batch["segment_ids"], rng, verifier)
    loss = loss_from_windows(s, w)
    st = acceptance_stats(jax.lax.stop_gradient(w["lq"]), w["valid"], w["greedy_match"])
    G = s.gamma
    metrics = {"loss": loss, "tokens": w["valid"].any(-1).sum(), "expected_streak": st["expected_streak"],
               "greedy_streak": st["greedy_streak"], "alpha_1": st["alpha"][0],
               "alpha_mid": st["alpha"][max(G // 2 - 1, 0)], "alpha_last": st["alpha"][G - 1]}
    return loss, metrics


def make_objective(s: Settings, verifier=None) -> Objective:
    """The calibration objective for the training loop. The verifier (frozen) is a Transformer or None.

    Losses without a teacher: `loss(drafter, batch, rng)`. kd_first / kd_window declare the verifier's nnx state
    as the objective's input (`Objective.inputs`): the training loop passes its pure dict to the jitted step as an
    argument, sharded like the verifier's parameters. Closing over it instead would make every teacher weight a
    constant of the compiled step: harmless for a tiny model, wrong for a 7B one (the whole teacher inlined into
    the program, replicated, recompiled per teacher).
    """
    if s.needs_verifier and verifier is None:
        raise ConfigError(f"calibrate.loss={s.loss} needs a verifier: set calibrate.verifier=<model dir>")
    name = f"calibrate_{s.loss}"
    if verifier is not None and s.needs_verifier:
        gv, vstate = nnx.split(verifier)

        def kd_loss(drafter, batch, rng, teacher):
            return calibration_loss(s, drafter, batch, rng, nnx.merge(gv, jax.lax.stop_gradient(teacher)))

        return Objective(name, kd_loss, inputs=vstate)
    return Objective(name, functools.partial(calibration_loss, s))
