"""eval.drafter_shapes' arithmetic on hand-made acceptance and costs: predicted speed-up at each draft length,
the best one, the paired comparison with the control, and the refusal of a report without the named drafters."""

from __future__ import annotations

import pytest

from eval import drafter_shapes as ds
from tests.conftest import tiny_config


def kernel_row(name, rate, row_tokens, row_calls):
    return {"drafter": name, "draft_temperature": 0.0, "accept_rate": rate, "path": f"/x/{name}",
            "tokens_per_verifier_call": sum(row_tokens) / sum(row_calls), "tau_ci95": [1.0, 9.0],
            "row_tokens": row_tokens, "row_verifier_calls": row_calls}


def test_speedup_is_expected_tokens_over_round_cost_and_the_best_gamma_wins():
    report = {"kernel": [kernel_row("control", [0.5, 0.25, 0.125, 0.0625], [10, 10], [5, 5]),
                         kernel_row("deep", [0.8, 0.6, 0.4, 0.2], [10, 12], [4, 4]),
                         {**kernel_row("deep", [0.0] * 4, [1], [1]), "draft_temperature": 1.0}]}
    acc = ds.acceptance(report, ["control", "deep"])
    assert acc["deep"]["accept_rate"] == [0.8, 0.6, 0.4, 0.2]  # the argmax-draft row, not the sampled one
    cfgs = {"control": tiny_config(), "deep": tiny_config(num_layers=3)}
    rounds = {"control": {1: 1.2, 2: 1.5, 4: 3.0}, "deep": {1: 1.5, 2: 1.8, 4: 3.2}}
    rows = {r["drafter"]: r for r in ds.drafter_rows(acc, cfgs, rounds, (1, 2, 4), "control")}
    c, d = rows["control"], rows["deep"]
    assert c["tau_by_gamma"] == {1: 1.5, 2: 1.75, 4: 1.9375}
    assert c["speedup"][1] == pytest.approx(1.5 / 1.2) and c["speedup"][4] == pytest.approx(1.9375 / 3.0)
    assert c["best_gamma"] == 1 and c["best_speedup"] == pytest.approx(1.25)
    assert d["tau_by_gamma"][4] == pytest.approx(3.0) and d["best_gamma"] == 2
    assert d["best_speedup"] == pytest.approx(2.4 / 1.8)
    assert d["tau_vs_control"] == pytest.approx((22 / 8) / 2.0) and "tau_vs_control" not in c
    lo, hi = d["tau_vs_control_ci95"]
    assert lo <= d["tau_vs_control"] <= hi
    assert (d["layers"], d["parameters"]) == (3, tiny_config(num_layers=3).num_params())
    meta = {"device": "cpu", "ar_ms": 1.0, "ctx": 256}
    shapes = [{"layers": 2, "hidden": 32, "parameters": 1000, "round_over_ar": rounds["control"],
               "tau_to_match": 3.75}]
    budget = [{"data": "d", "steps": "s", "tau": 2.0, "tau_ci95": None, "speedup_g16": 1.1}]
    md = ds.render(list(rows.values()), shapes, budget, meta, (1, 2, 4), "python -m eval.drafter_shapes")
    assert "| deep | 3 x 32 |" in md and "**1.33x** (g=2)" in md and "+37.5%" in md


def test_a_report_without_the_drafters_is_refused():
    with pytest.raises(ValueError, match=r"no argmax-draft row for \['grown'\]"):
        ds.acceptance({"kernel": [kernel_row("control", [0.5], [2], [1])]}, ["control", "grown"])
