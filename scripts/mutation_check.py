"""Mutation check of the core claims: does the test suite catch small deliberate bugs?

Each mutation below is one exact text replacement in one library file plus the tests expected to catch it. For
every mutation the repository is copied (without .git, .venv, runs, results, data) into a fresh temporary
directory, the replacement is applied there (the old snippet must occur exactly once, or the script stops), and the
named tests run in that copy with this interpreter. A mutation is caught when a test fails. The result is a
markdown table (mutation, caught?, catching tests), printed and optionally written to a file.

    python scripts/mutation_check.py                      # every mutation, stop each run at the first failure
    python scripts/mutation_check.py --all-failures       # run every named test, list every failing one
    python scripts/mutation_check.py --only vpos_off_by_one --baseline --out /tmp/mutations.md

--baseline first runs each mutation's tests on an unmodified copy (they must pass, or a catch means nothing).
Exit status: 0 when every mutation is caught (and every baseline passes), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXCLUDE_AT_ROOT = {".git", ".venv", "runs", "results", "data", ".pytest_cache"}
EXCLUDE_ANYWHERE = {"__pycache__"}

REF = "tests/test_greedy_reference.py"
CAL = "tests/test_calibration.py"
ACC = "tests/test_acceptance.py"

MUTATIONS = [
    dict(
        name="vpos_off_by_one",
        what="verifier positions off by one in the decode loop",
        file="specdiff_jax/decode/kernel.py",
        old="vpos = L[:, None] + jnp.tile(j, K)[None]",
        new="vpos = L[:, None] + 1 + jnp.tile(j, K)[None]",
        tests=[REF],
    ),
    dict(
        name="multi_draft_residual_not_carried",
        what="multi_draft: the residual restarts from p after each rejection instead of carrying the running one",
        file="specdiff_jax/acceptance.py",
        old="r = jnp.where(rej[:, None], pq_residual(r, q_j), r)",
        new="r = jnp.where(rej[:, None], pq_residual(p_j, q_j), r)",
        tests=[f"{ACC}::test_multi_draft_by_hand", f"{ACC}::test_multi_draft_carries_the_residual_across_rejections",
               f"{ACC}::test_kernel_is_lossless_at_temperature"],
    ),
    dict(
        name="window_mean_over_all_windows",
        what="calibration losses averaged over all windows, empty ones included",
        file="specdiff_jax/calibration/losses.py",
        old="return jnp.where(w, per_window, 0.0).sum() / jnp.maximum(w.sum(), 1)",
        new="return jnp.where(w, per_window, 0.0).sum() / w.size",
        tests=[f"{CAL}::test_losses_average_over_non_empty_windows_only",
               f"{CAL}::test_calibrate_step_loss_ignores_empty_windows"],
    ),
    dict(
        name="kd_first_over_all_windows",
        what="kd_first averaged over all windows, empty ones included",
        file="specdiff_jax/calibration/losses.py",
        old="return jnp.where(v, kl, 0.0).sum() / jnp.maximum(v.sum(), 1)",
        new="return jnp.where(v, kl, 0.0).sum() / v.size",
        tests=[f"{CAL}::test_losses_average_over_non_empty_windows_only",
               f"{CAL}::test_calibrate_step_loss_ignores_empty_windows"],
    ),
    dict(
        name="verifier_mask_causal_across_chains",
        what="verifier mask causal across the K chains (chain k sees chains < k)",
        file="specdiff_jax/decode/kernel.py",
        old="vmask = block_diag(K, np.tril(np.ones((G + 1, G + 1), bool)))",
        new="vmask = causal(K * (G + 1))",
        tests=[REF],
    ),
    dict(
        name="pq_bonus_from_residual",
        what="pq: after a fully accepted draft the bonus token comes from norm(max(0, p_G+1 - q_G)) instead of p_G+1",
        file="specdiff_jax/acceptance.py",
        old="q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)",
        new="q_pad = jnp.concatenate([q, q[:, -1:]], axis=1)",
        tests=[f"{ACC}::test_kernel_is_lossless_at_temperature"],
    ),
    dict(
        name="sps_drafter_cache_claims_x_G",
        what="loop: after a full acceptance the AR drafter's cache counts x_G as written (it never is)",
        file="specdiff_jax/decode/drafters/ar.py",
        old="cached = jnp.where(done, 0, jnp.minimum(n, G - 1))",
        new="cached = jnp.where(done, 0, jnp.minimum(n, G))",
        tests=[REF],
    ),
    dict(
        name="block_drafter_cache_counts_padding",
        what="loop: the block drafter's cache length counts every pending slot, padding included",
        file="specdiff_jax/decode/drafters/block.py",
        old="dcache = dcache.write(k[:, :, :Pn], v[:, :, :Pn], D0).with_lengths(D0 + pend_n)",
        new="dcache = dcache.write(k[:, :, :Pn], v[:, :, :Pn], D0).with_lengths(D0 + Pn)",
        tests=[REF],
    ),
    dict(
        name="kv_of_chain_0_committed",
        what="loop: the verifier cache keeps chain 0's keys/values whichever chain self-selection picked",
        file="specdiff_jax/decode/kernel.py",
        old="kv = kv.reshape(kv.shape[:2] + (K, G + 1) + kv.shape[3:])[:, rows, chain]",
        new="kv = kv.reshape(kv.shape[:2] + (K, G + 1) + kv.shape[3:])[:, rows, 0 * chain]",
        tests=[REF],
    ),
    dict(
        name="cache_write_one_slot_early",
        what="cache: a block is written one slot before its offset (overwriting the last committed entry)",
        file="specdiff_jax/cache.py",
        old="jnp.swapaxes(new, 0, 1).astype(buf.dtype), (0, off, 0))",
        new="jnp.swapaxes(new, 0, 1).astype(buf.dtype), (0, jnp.maximum(off - 1, 0), 0))",
        tests=["tests/test_model.py", REF],
    ),
    dict(
        name="hf_rms_norm_eps_ignored",
        what="converter: config.json's rms_norm_eps ignored (default 1e-6 used)",
        file="specdiff_jax/hf_checkpoint.py",
        old='rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),',
        new="rms_norm_eps=1e-6,",
        tests=["tests/test_convert.py::test_every_mapped_config_field_round_trips",
               "tests/test_convert.py::test_hf_parity_with_non_default_fields"],
    ),
]


def _ignore(src: str, names: list[str]) -> set[str]:
    at_root = Path(src).resolve() == ROOT
    return {n for n in names if n in EXCLUDE_ANYWHERE or (at_root and n in EXCLUDE_AT_ROOT)}


def scratch_copy(mutation: dict | None) -> Path:
    """A copy of the repository in a new temporary directory, with `mutation` applied (None: unmodified)."""
    dst = Path(tempfile.mkdtemp(prefix="mutation_")) / "repo"
    shutil.copytree(ROOT, dst, ignore=_ignore, symlinks=True)
    if mutation is not None:
        path = dst / mutation["file"]
        text = path.read_text()
        count = text.count(mutation["old"])
        if count != 1:
            raise SystemExit(f"error: mutation {mutation['name']}: the old snippet occurs {count} times in "
                             f"{mutation['file']} (must be exactly once); retarget it:\n  {mutation['old']}")
        path.write_text(text.replace(mutation["old"], mutation["new"]))
    return dst


def run_tests(repo: Path, tests: list[str], python: str, stop_first: bool) -> tuple[int, list[str], str]:
    """(pytest exit status, failing test ids, output tail) of `tests` run inside `repo`."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("PYTHONPATH", None)
    probe = subprocess.run([python, "-c", "import specdiff_jax; print(specdiff_jax.__file__)"], cwd=repo, env=env,
                           capture_output=True, text=True)
    if not probe.stdout.strip().startswith(str(repo)):
        raise SystemExit(f"error: in {repo}, `import specdiff_jax` loads {probe.stdout.strip() or probe.stderr!r}, "
                         "not the scratch copy; run this script with the project's interpreter from any directory")
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *(["-x"] if stop_first else []), *tests]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)))
    return r.returncode, failed, "\n".join(out.splitlines()[-15:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="mutation names to run (default: all)")
    p.add_argument("--all-failures", action="store_true", help="run every named test instead of stopping at the first "
                                                                  "failure (slower; lists every catching test)")
    p.add_argument("--baseline", action="store_true", help="first check that the tests pass on an unmodified copy")
    p.add_argument("--python", default=sys.executable, help="interpreter with the project installed")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = p.parse_args(argv)
    names = [m["name"] for m in MUTATIONS]
    if args.list:
        for m in MUTATIONS:
            print(f"{m['name']}: {m['what']} ({m['file']})")
        return 0
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        raise SystemExit(f"error: unknown mutation(s) {unknown}; choose from {names}")
    chosen = [m for m in MUTATIONS if args.only is None or m["name"] in args.only]
    for m in chosen:  # every snippet must apply before anything runs
        text = (ROOT / m["file"]).read_text()
        if text.count(m["old"]) != 1:
            raise SystemExit(f"error: mutation {m['name']}: the old snippet occurs {text.count(m['old'])} times in "
                             f"{m['file']} (must be exactly once); retarget it:\n  {m['old']}")
    ok = True
    rows = ["| mutation | file | caught? | catching test | seconds |", "|---|---|---|---|---|"]
    for m in chosen:
        if args.baseline:
            repo = scratch_copy(None)
            try:
                rc, failed, tail = run_tests(repo, m["tests"], args.python, stop_first=True)
            finally:
                shutil.rmtree(repo.parent, ignore_errors=True)
            if rc != 0:
                ok = False
                print(f"BASELINE FAILS for {m['name']} (status {rc}): {failed}\n{tail}", flush=True)
        t0 = time.time()
        repo = scratch_copy(m)
        try:
            rc, failed, tail = run_tests(repo, m["tests"], args.python, stop_first=not args.all_failures)
        finally:
            shutil.rmtree(repo.parent, ignore_errors=True)
        secs = time.time() - t0
        if rc == 1 and failed:
            caught = "yes"
        elif rc == 0:
            caught, ok = "**no**", False
        else:  # collection error, interrupted, ...: the mutation or the test selection is broken
            caught, ok = f"error (pytest status {rc})", False
        tests = ", ".join(f"`{f}`" for f in failed) or "-"
        row = f"| {m['what']} (`{m['name']}`) | `{m['file']}` | {caught} | {tests} | {secs:.0f} |"
        rows.append(row)
        print(row, flush=True)
        if caught != "yes":
            print(tail, flush=True)
    table = "\n".join(rows)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
