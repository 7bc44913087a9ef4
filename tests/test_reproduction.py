"""eval.reproduction: the report states the paper's numbers beside ours and its agreement sentences follow the
measurements (hand-made results, no decoding)."""

from __future__ import annotations

from eval import reproduction as rp


def _fig2(base, kd, streak, G=16):
    def row(p):
        rate = [p ** j for j in range(1, G + 1)]
        return {"tau": 1 + sum(rate), "accept_rate": rate, "alpha": [rate[0]] + [p] * (G - 1)}
    return {"base": row(base), "kd": row(kd), "streak": row(streak)}


def _result(fig2, sel_gain=0.1, streak_gain=0.3):
    fig5 = [{"num_drafts": k, "draft_temperature": t, "tau": 1 + 0.1 * k * t} for t in (1.0, 2.0) for k in (1, 8)]
    t3 = []
    for d, s in (("base", False), ("base", True), ("streak", False), ("streak", True)):
        g = (1 + streak_gain * (d == "streak")) * (1 + sel_gain * s)
        t3.append({"drafter": d, "self_selection": s, "tau": 2 * g, "tau_vs_base": g, "ms_per_round": 1.0,
                   "speed_vs_base": g})
    fig9 = [{"denoise_steps": n, "tau": 2.0, "ms_per_round": float(n), "extra_ms_per_round": n - 1.0}
            for n in (1, 2)]
    fig6 = {m: {"prefill_s": 0.01, "tokens_per_s": r, "tokens": {"0.1": 0.09 * r}} for m, r in
            (("ar", 100.0), ("specdiff2", 150.0))}
    meta = {"command": "python -m eval.reproduction", "seconds": 1.0, "verifier": "v", "drafters": {"base": "b"},
            "prompts": 8, "new_tokens": 64, "gamma": 16, "prompt_sources": "4 HumanEval", "notes": [],
            "plots": ["fig2_acceptance.png"]}
    return {"fig2": fig2, "fig5": fig5, "table3": t3, "fig9": fig9, "fig6": fig6, "meta": meta}


def test_report_carries_the_papers_numbers_and_the_measured_ones():
    md = rp.render(_result(_fig2(0.3, 0.4, 0.8)), "figures/reproduction")
    for heading in ("Fig. 2", "Fig. 5", "Table 3", "Fig. 9", "Fig. 6"):
        assert heading in md
    assert "0.260" in md and "0.145" in md  # the paper's P(8) for streak and KD
    assert f"{0.8 ** 8:.3f} / 0.260" in md  # ours beside the paper's
    assert "the paper's ordering (streak above KD above base at later positions) holds" in md
    assert "K=8 at draft temperature 2" in md and "the paper's trend holds" in md
    assert "streak alone +30%" in md and "self-selection alone +10%" in md and "both +43%" in md
    assert "1.50x as many tokens" in md
    assert "](figures/reproduction/fig2_acceptance.png)" in md
    assert "fig5_selection.png" not in md  # plots that were not written are not linked


def test_agreement_sentences_follow_the_measurements():
    md = rp.render(_result(_fig2(0.8, 0.4, 0.3), sel_gain=0.3, streak_gain=0.1))
    assert "does not hold" in md.split("## 2.")[0]
    assert "self-selection is the larger gain here, unlike the paper" in md


def test_table3_sentence_names_what_helps():
    assert rp._table3_sentence(0.3, 0.1).startswith("Both components help")
    assert rp._table3_sentence(-0.2, -0.7).startswith("Neither component raises speed here")
    assert rp._table3_sentence(0.2, -0.7).startswith("Only streak distillation helps here")


def test_only_remeasures_the_named_findings_and_keeps_the_rest(tmp_path):
    import argparse
    import json

    import pytest

    res = _result(_fig2(0.3, 0.4, 0.8))
    res["meta"]["sizes"] = rp.plan_sizes(False)
    (tmp_path / "report.json").write_text(json.dumps(res))
    args = argparse.Namespace(only="fig9", out=str(tmp_path), full=False)
    kept, names = rp._previous(args)
    assert names == {"fig9"} and set(kept) == {"fig2", "fig5", "table3", "fig6", "meta"}
    assert kept["fig6"] == res["fig6"]
    _, names = rp._previous(argparse.Namespace(only="table3", out=str(tmp_path), full=False))
    assert names == {"table3", "fig2"}  # table3's single-draft rows are fig2's, timed in the same run
    assert rp._previous(argparse.Namespace(only=None, out=str(tmp_path), full=False)) == ({}, None)
    with pytest.raises(ValueError, match="unknown finding"):
        rp._previous(argparse.Namespace(only="fig7", out=str(tmp_path), full=False))
    with pytest.raises(ValueError, match="other sizes"):
        rp._previous(argparse.Namespace(only="fig9", out=str(tmp_path), full=True))
    with pytest.raises(FileNotFoundError, match="--only needs"):
        rp._previous(argparse.Namespace(only="fig9", out=str(tmp_path / "none"), full=False))
