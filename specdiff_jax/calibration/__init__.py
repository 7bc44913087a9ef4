"""Train-time alignment of a diffusion drafter to its verifier: streak distillation and its baselines
(docs/METHOD.md §6).

    losses      distributions, the losses (streak, ce_streak, kd_first, kd_window, mdlm), acceptance statistics
    windows     where the windows of a batch are, `Settings`, the drafter / verifier forwards over the windows
    objective   the `Objective` the training loop optimises
    evaluation  held-out window statistics and the decode kernel's acceptance of a drafter
    run         a whole calibration run (what `python -m train.calibrate` calls)

The names below are re-exported so that `from specdiff_jax import calibration as C; C.streak_loss(...)` works.
"""

from specdiff_jax.calibration.losses import (LOSSES, LQ_FLOOR, acceptance_stats, ce_streak_loss, expected_streak,
                                             kd_first_loss, kd_window_loss, kl_divergence, log_probs,
                                             mdlm_window_loss, streak_grad_formula, streak_loss,
                                             streak_prefix_probs, target_logprobs, teacher_probs)
from specdiff_jax.calibration.windows import (COMPLETION_SEGMENT, PROMPT_SEGMENT, Settings, check_drafter,
                                              drafter_window_logits, num_windows, verifier_window_logits,
                                              window_forward, window_layout)
from specdiff_jax.calibration.objective import calibration_loss, loss_from_windows, make_objective
from specdiff_jax.calibration.evaluation import decode_statistics, evaluate, kernel_eval, window_stats

__all__ = [
    "COMPLETION_SEGMENT", "LOSSES", "LQ_FLOOR", "PROMPT_SEGMENT", "Settings", "acceptance_stats", "calibration_loss",
    "ce_streak_loss", "check_drafter", "decode_statistics", "drafter_window_logits", "evaluate", "expected_streak",
    "kd_first_loss", "kd_window_loss", "kernel_eval", "kl_divergence", "log_probs", "loss_from_windows",
    "make_objective", "mdlm_window_loss", "num_windows", "streak_grad_formula", "streak_loss", "streak_prefix_probs",
    "target_logprobs", "teacher_probs", "verifier_window_logits", "window_forward", "window_layout", "window_stats",
]
