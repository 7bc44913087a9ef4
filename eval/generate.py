"""Generate a completion with any decoding method and print it with the decoding statistics.

    python -m eval.generate --verifier PATH [--drafter PATH] --method specdiff2 --prompt "def add(a, b):" \
        --tokenizer assets/tiny --gamma 16 --num-drafts 4 --max-new-tokens 64
    python -m eval.generate --verifier PATH --method ar --prompt-ids 1,2,3
    python -m eval.generate --verifier PATH --drafter A --drafter B --method auto --prompt "def add(a, b):"

Without --drafter, specdiff2 and auto take the drafter that the MANIFEST.json beside the verifier (assets/tiny/)
records for --temperature (`specdiff_jax.assets.drafter_for_temperature`).
Model paths are our model directories or Hugging Face directories (`load_pretrained`). Prompt text needs a
tokenizer (--tokenizer, default: the verifier directory if it holds one). Bad input exits with status 2 and a
one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        _fail(f"{message} (see python -m eval.generate --help)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m eval.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--verifier", required=True, help="verifier model directory (ours or Hugging Face)")
    ap.add_argument("--drafter", action="append", help="drafter model directory (needed by sps and specdiff; "
                    "specdiff2 and auto default to the drafter the verifier directory's MANIFEST.json records for "
                    "--temperature); --method auto takes it several times and picks one")
    ap.add_argument("--method", required=True, choices=["ar", "sps", "specdiff", "specdiff2", "auto"],
                    help="auto: the method and settings with the highest predicted tokens/s on this machine "
                    "(measures a cost model and the drafters' acceptance on the prompt, cached on disk)")
    ap.add_argument("--adaptive-gamma", action="store_true", help="rounds choose among gamma/4, gamma/2, gamma "
                    "from the acceptance seen so far (lossless)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with --tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    ap.add_argument("--tokenizer", help="tokenizer directory or file (default: the verifier directory)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--gamma", type=int, default=16)
    ap.add_argument("--num-drafts", type=int, default=1)
    ap.add_argument("--denoise-steps", type=int, default=1)
    ap.add_argument("--draft-temperature", type=float, default=1.0)
    ap.add_argument("--acceptance", default="auto", choices=["auto", "greedy", "pq", "delta", "multi_draft"])
    ap.add_argument("--eos-id", type=int, default=None, help="token id that ends a row (default: the verifier's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="override the stored compute/param dtype")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return ap


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _manifest_drafters(args, verifier) -> list:
    """No --drafter: the drafter the verifier directory's MANIFEST.json records for --temperature (auto: with the
    AR drafter beside it); ar needs none."""
    if args.method == "ar":
        return []
    from specdiff_jax import assets

    adir = Path(args.verifier).resolve().parent
    if args.method == "auto":
        return assets.embedded_candidates(verifier, args.temperature, adir)
    try:
        return [assets.load_drafter(args.temperature, adir, dtype=args.dtype)]
    except FileNotFoundError as e:
        _fail(f"--method {args.method} without --drafter: {e}")


def _check_args(args) -> list[int] | None:
    """Validate the command line before anything heavy loads; the prompt ids of --prompt-ids, else None."""
    ids = None
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:  # undecodable argv bytes arrive as lone surrogates
            _fail("--prompt is not valid UTF-8 text (the shell passed bytes that do not decode); pass UTF-8 text "
                  "or the token ids with --prompt-ids")
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t != ""]
        except ValueError:
            _fail(f"--prompt-ids {args.prompt_ids!r} must be comma-separated integers, e.g. 1,2,3")
        if not ids:
            _fail("--prompt-ids is empty: give at least one token id")
    if args.drafter is None and args.method not in ("ar", "auto", "specdiff2"):
        _fail(f"--method {args.method} needs --drafter PATH (ar, and specdiff2 / auto beside a verifier whose "
              "directory's MANIFEST.json records drafters by temperature, run without one)")
    if args.drafter and len(args.drafter) > 1 and args.method != "auto":
        _fail(f"--method {args.method} takes one --drafter (several are for --method auto)")
    for flag, path in [("--verifier", args.verifier)] + [("--drafter", d) for d in args.drafter or []]:
        if not Path(path).exists():
            _fail(f"{flag} {path!r} does not exist")
    return ids


def _tokenizer(args):
    if args.prompt is None and args.tokenizer is None:
        return None
    from specdiff_jax.tokenizer import load_tokenizer

    tpath = args.tokenizer or args.verifier
    try:
        return load_tokenizer(tpath)
    except Exception as e:  # noqa: BLE001 - one-line message for any tokenizer problem
        _fail(f"cannot load a tokenizer from {tpath!r} ({e}); pass --tokenizer PATH or use --prompt-ids")


def _generate(args, ids: list[int]):
    """Build the Decoder and decode twice (the first call compiles); (output, compile+run s, run s)."""
    from specdiff_jax import decode
    from specdiff_jax import load_pretrained

    verifier = load_pretrained(args.verifier, dtype=args.dtype)
    drafters = [load_pretrained(d, dtype=args.dtype) for d in args.drafter or []] or \
        _manifest_drafters(args, verifier)
    drafter = drafters if args.method == "auto" else (drafters[0] if drafters else None)
    dec = decode.Decoder(
        verifier, drafter, method=args.method, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, gamma=args.gamma,
        num_drafts=args.num_drafts, denoise_steps=args.denoise_steps,
        draft_temperature=args.draft_temperature, acceptance=args.acceptance, eos_id=args.eos_id,
        adaptive_gamma=args.adaptive_gamma)
    t0 = time.perf_counter()
    dec([ids], seed=args.seed)  # first call includes compilation
    t1 = time.perf_counter()
    out = dec([ids], seed=args.seed)
    return out, t1 - t0, time.perf_counter() - t1


def _print_result(gen: list[int], text: str | None, st: dict) -> None:
    print(text if text is not None else " ".join(map(str, gen)))
    print("---")
    if "plan" in st:
        pl = st["plan"]
        print(f"auto chose: {pl['method']} gamma {pl['gamma']} K {pl['num_drafts']} draft T "
              f"{pl['draft_temperature']} {pl['acceptance']} (predicted {pl['predicted_tokens_per_s']:.0f} tokens/s)")
    for k in ("method", "acceptance", "gamma", "tokens", "verifier_calls", "drafter_calls", "tokens_per_verifier_call",
              "mean_accepted", "accepted_hist", "alpha", "run_s", "tokens_per_s", "compile_and_run_s"):
        v = st[k]
        if isinstance(v, float):
            v = round(v, 3)
        elif isinstance(v, list) and v and isinstance(v[0], float):
            v = [round(x, 3) for x in v]
        print(f"{k}: {v}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    ids = _check_args(args)
    try:
        tok = _tokenizer(args)
        if args.prompt is not None:
            ids = tok.encode(args.prompt)
            if not ids:
                _fail("--prompt encodes to no tokens; give a non-empty prompt")
        out, compile_and_run, run = _generate(args, ids)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    gen = out.rows()[0]
    st = dict(out.stats)
    st.update(compile_and_run_s=round(compile_and_run, 3), run_s=round(run, 3),
              tokens_per_s=round(len(gen) / max(run, 1e-9), 2))
    text = tok.decode(gen) if tok is not None else None
    if args.json:
        print(json.dumps({"prompt_ids": ids, "ids": gen, "text": text, "stats": st}))
        return 0
    _print_result(gen, text, st)
    return 0


if __name__ == "__main__":
    sys.exit(main())
