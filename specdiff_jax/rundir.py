"""The run directory of a training run: its lock, signal handling, metrics log and checkpoints.

    <workdir>/config.yaml          the resolved run config
    <workdir>/.lock                pid of the live run (a stale lock of a dead process is taken over)
    <workdir>/metrics.jsonl        one JSON record per logged step (and tb/ for TensorBoard)
    <workdir>/checkpoints/<step>/  Orbax: train state, data iterator state (JSON), run metadata (JSON)

Everything here is Python state at the program edge; the training loop (`specdiff_jax.training`) uses it and the
jitted step never sees it. Errors name what is intact and what to do (docs/RELIABILITY.md).

Work dirs may be local or remote (`gs://bucket/run`): every path goes through `etils.epath` (as Orbax's do), never
the builtin open() or pathlib, and the metrics log is rewritten whole on object stores, which cannot append.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")


def as_path(path) -> epath.Path:
    """A user-given work / data dir (str, os.PathLike or epath.Path, local or `gs://...`) as an epath.Path."""
    return path if isinstance(path, epath.Path) else epath.Path(path)


def is_remote(path) -> bool:
    return str(path).startswith(REMOTE_PREFIXES)


def absolute(path) -> epath.Path:
    """A local path made absolute (Orbax wants one); a remote one as it is."""
    p = as_path(path)
    return p if is_remote(p) else p.absolute()


def write_json(workdir, name: str, obj: Any) -> epath.Path:
    """<workdir>/<name> := obj as indented JSON (local or remote work dir)."""
    p = as_path(workdir) / name
    p.write_text(json.dumps(obj, indent=2) + "\n")
    return p


class TrainingError(RuntimeError):
    """The run cannot continue (diverged, incompatible checkpoint, busy work dir); the message says why and what to do."""


class TrainingDiverged(TrainingError):
    """Loss or gradient became NaN/inf; the message names the step and the last good checkpoint."""


class WorkdirLock:
    """Refuse two live runs on one work dir (a stale lock of a dead process is taken over)."""

    def __init__(self, workdir, enabled: bool = True):
        self.path = as_path(workdir) / LOCK_FILE
        self.held = False
        self.enabled = enabled  # multi-process runs share the work dir: process 0 holds the lock

    def __enter__(self):
        if not self.enabled:
            return self
        if self.path.exists():
            try:
                pid = int(self.path.read_text().strip() or 0)
            except ValueError:
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise TrainingError(f"work dir {str(self.path.parent)!r} is in use by process {pid}; wait for it, "
                                    "stop it, or choose another --workdir")
        self.path.write_text(str(os.getpid()))
        self.held = True
        return self

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopOnSignal:
    """SIGTERM/SIGINT set a flag that the loop checks after each step; a second signal gets the default action."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        self.signum = signum
        for s, h in self._old.items():  # a second signal is not caught: the user insists
            signal.signal(s, h)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


class MetricsLog:
    """metrics.jsonl (and TensorBoard scalars) of the primary process; a no-op elsewhere."""

    def __init__(self, workdir, enabled: bool = True, tensorboard: bool = True):
        workdir = as_path(workdir)
        self.path = workdir / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        self._remote = is_remote(workdir)  # object stores cannot append: the log is rewritten whole
        self._lines: list[str] | None = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tb"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                self.tb = None

    def write(self, step: int, record: dict, prefix: str):
        if not self.enabled:
            return
        rec = {"step": step, **{f"{prefix}{k}" if prefix == "val_" else k: v for k, v in record.items()}}
        line = json.dumps(rec) + "\n"
        if self._remote:
            if self._lines is None:  # a resumed run continues the log it finds
                self._lines = [self.path.read_text()] if self.path.exists() else []
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
            return
        with self.path.open("a") as f:
            f.write(line)
        if self.tb is not None:
            for k, v in record.items():
                self.tb.add_scalar(f"{prefix.rstrip('_') or 'train'}/{k}", v, step)

    def close(self):
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def has_checkpoint(workdir) -> bool:
    d = as_path(workdir) / CHECKPOINT_DIR
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def checkpoint_manager(workdir, keep: int, async_save: bool, cleanup: bool = False):
    """cleanup: delete partial checkpoints (`<step>.orbax-checkpoint-tmp`, left by a run killed while saving or a
    save that failed; orbax deletes on the primary process only). Only a run holding the work dir's lock may
    clean up, never a reader of a live run."""
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                        cleanup_tmp_directories=cleanup)
    return ocp.CheckpointManager(absolute(as_path(workdir) / CHECKPOINT_DIR), options=opts)


def abstract_target(shapes, shardings):
    """Restore target: the train state's shapes placed by `shardings` (restore onto another topology)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def restore_args(target=None):
    """Orbax arguments restoring a checkpoint's metadata, and with a target also its state and data state."""
    if target is None:
        return ocp.args.Composite(meta=ocp.args.JsonRestore())
    return ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                              meta=ocp.args.JsonRestore())


class Checkpoints:
    """The run's checkpoint manager: resume checks, saves whose failures name what is intact, clean shutdown."""

    def __init__(self, workdir, keep: int, async_save: bool):
        self.workdir = as_path(workdir)
        self.mngr = checkpoint_manager(workdir, keep, async_save, cleanup=True)
        self.in_flight: int | None = None  # step of the (asynchronous) save not yet known to be complete
        self.writers: set = set()  # threads alive before that save started

    def path(self, step: int) -> str:
        return str(self.workdir / CHECKPOINT_DIR / str(step))

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def resume(self, target, meta: dict):
        """The latest checkpoint restored into `target` (state, data, meta), or None when there is none.

        Refused with a TrainingError, before any state is read, when it cannot be read or belongs to a run with
        another model, objective or LoRA settings than `meta` describes.
        """
        start = self.mngr.latest_step()
        if start is None:
            return None
        where = self.path(start)
        try:  # the metadata first: a checkpoint of another model gets a clear message, not a tree diff
            old = self.mngr.restore(start, args=restore_args()).meta or {}
        except Exception as e:  # noqa: BLE001 - orbax raises assorted types on damaged checkpoints
            self.mngr.close()
            raise TrainingError(f"cannot read the checkpoint {where} ({type(e).__name__}: {str(e)[:200]}); "
                                "delete it to resume from the previous one, or use another --workdir") from None
        mismatch = _other_run(old, meta)
        if mismatch:
            self.mngr.close()
            raise TrainingError(f"work dir {str(self.workdir)!r} holds a checkpoint {mismatch}")
        try:
            r = self.mngr.restore(start, args=restore_args(target))
        except Exception as e:  # noqa: BLE001
            self.mngr.close()
            raise TrainingError(f"cannot restore the checkpoint {where} ({type(e).__name__}: {str(e)[:200]}); "
                                "delete it to resume from the previous one, or use another --workdir") from None
        print(f"resuming from {where} at step {start}", flush=True)
        return r

    def wait(self) -> None:
        """Wait for the save in flight; a failed one (full disk, ...) stops the run, naming what is intact."""
        try:
            self.mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax re-raises the writer thread's error as is
            # orbax reports the first failed item while the others may still be writing: let them end, so that
            # nothing writes into the partial checkpoint after the error (or races a resume's cleanup)
            join_threads_since(self.writers, timeout=30.0)
            raise save_failed(self.workdir, self.mngr, self.in_flight, e) from None
        self.in_flight = None

    def save(self, step: int, state, data_state, meta: dict) -> str:
        self.wait()  # orbax would wait inside save(); here an earlier failure is named by its own step
        self.in_flight, self.writers = step, set(threading.enumerate())
        try:
            self.mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # noqa: BLE001
            join_threads_since(self.writers, timeout=30.0)
            raise save_failed(self.workdir, self.mngr, step, e) from None
        return self.path(step)

    def close(self) -> None:
        try:
            self.mngr.wait_until_finished()
            self.mngr.close()
        except Exception:  # noqa: BLE001 - only reached with an error already on its way (a failed save)
            pass


def _other_run(old: dict, meta: dict) -> str | None:
    """Why a checkpoint with metadata `old` cannot be resumed by the run described by `meta` (None: it can)."""
    if old.get("lora") != meta.get("lora"):
        return (f"with LoRA settings {old.get('lora')} but this run has {meta.get('lora')}; use another --workdir, "
                "or restore the settings it was started with")
    if old.get("model") != meta["model"] or old.get("objective") != meta["objective"]:
        diff = sorted(k for k in meta["model"] if (old.get("model") or {}).get(k) != meta["model"][k])
        what = f"model keys {', '.join(diff)} differ" if diff else \
            f"objective {old.get('objective')!r} != {meta['objective']!r}"
        return f"of another run ({what}); use another --workdir, or delete its checkpoints/ to start over"
    return None


def join_threads_since(before: set, timeout: float) -> None:
    """Wait (at most `timeout` s in all) for the threads started since the snapshot `before` to end."""
    deadline = time.monotonic() + timeout
    for t in set(threading.enumerate()) - before:
        if t is not threading.current_thread():
            t.join(max(deadline - time.monotonic(), 0.0))


def save_failed(workdir, mngr, failed: int | None, e: BaseException) -> TrainingError:
    """The error of a checkpoint save that failed: its cause (a full disk is named as such) and what is intact."""
    cause, seen = e, set()
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    full = isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
    shown = cause if isinstance(cause, OSError) else e
    try:
        good = mngr.latest_step()
    except Exception:  # noqa: BLE001
        good = None
    if good == failed:  # pragma: no cover - the manager lists only finalized steps
        good = None
    workdir = as_path(workdir)
    intact = (f"the last complete checkpoint, {workdir / CHECKPOINT_DIR / str(good)} (step {good}), is intact"
              if good is not None else "no complete checkpoint was saved before it")
    fix = "free disk space (or lower checkpoint.keep)" if full else "fix the cause"
    return TrainingError(
        f"saving the checkpoint of step {failed} under {workdir / CHECKPOINT_DIR} failed"
        f"{' (disk full)' if full else ''}: {type(shown).__name__}: {str(shown)[:300]}; the run stopped and "
        f"{intact} (the partial one is ignored and removed on resume); {fix}, then rerun the same command to resume")
