"""Faults during training (docs/RELIABILITY.md): SIGINT / SIGTERM, kill -9 while a checkpoint is being written, a
full disk during a save, two runs on one work dir, NaN / inf losses and a damaged checkpoint, each followed by a
resume that must continue with exactly the losses of an uninterrupted run; and same-seed determinism of the losses
(in-process and across processes).

One configuration and one dataset throughout (the `ar` objective on the tiny model of test_training, a checkpoint
every step, asynchronous saves), so every in-process run reuses one set of compiled programs; the only subprocess
is the one that must really be killed with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdiff_jax import training
from specdiff_jax.config.run import load_config
from specdiff_jax.cli import run_program
from specdiff_jax.training import Hooks, TrainingDiverged, TrainingError, restore_checkpoint, train
from tests.conftest import B, V, dataset, make_rows, ov

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
OVERRIDES = (f"train.steps={STEPS}", "checkpoint.save_every=1", "checkpoint.keep=3", "checkpoint.async_save=true",
             "data.val_batches=0", "checkpoint.export=false")
NAN_STEP = 5  # the batch of this step holds an out-of-range token id in the "bad data" variant


def config():
    return load_config(None, ov(*OVERRIDES))


def data(bad_step: int | None = None):
    """The unshuffled training stream (batch s-1 is step s); bad_step: that batch holds an id >= V (NaN loss)."""
    toks, seg = make_rows()
    if bad_step is not None:
        toks[(bad_step - 1) * B: bad_step * B, 7] = V + 100
    return dataset(toks, seg, shuffle=False)


def steps_on_disk(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def partial_on_disk(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir() if "orbax-checkpoint-tmp" in p.name)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The uninterrupted run: losses of steps 1..6 and its work dir (checkpoints 4, 5, 6)."""
    workdir = tmp_path_factory.mktemp("ref")
    r = train(config(), workdir, train_data=data(), val_batches=[])
    assert r.status == "completed" and sorted(r.losses) == list(range(1, STEPS + 1))
    return r.losses, workdir


def resume_and_check(workdir: Path, ref_losses: dict, first: int) -> training.TrainResult:
    """Resume the run in `workdir`: it must start after step first-1 and reproduce the reference losses exactly."""
    r = train(config(), workdir, train_data=data(), val_batches=[])
    assert r.status == "completed" and sorted(r.losses) == list(range(first, STEPS + 1)), r.losses
    for s in r.losses:
        assert r.losses[s] == ref_losses[s], (s, r.losses[s], ref_losses[s])  # bit-exact
    assert not partial_on_disk(workdir) and not (workdir / ".lock").exists()
    return r


# --- determinism ----------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_losses_and_parameters(ref, tmp_path):
    ref_losses, ref_dir = ref
    again = train(config(), tmp_path / "again", train_data=data(), val_batches=[])
    assert again.losses == ref_losses  # bit-exact, not approximately
    a, _, _ = restore_checkpoint(ref_dir, config())
    b, _, _ = restore_checkpoint(tmp_path / "again", config())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the comparison can fail: another data order (or seed) gives other losses
    toks, seg = make_rows()
    other = train(config(), tmp_path / "other", train_data=dataset(toks, seg, shuffle=True), val_batches=[])
    assert other.losses[2] != ref_losses[2]


# --- signals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_exits_cleanly_and_resume_is_exact(ref, tmp_path, capsys, sig):
    """A real signal to this process after step 3: the program saves step 3, reports it and returns status 0."""
    ref_losses, _ = ref
    before = signal.getsignal(sig)

    def at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), sig)

    status, result = run_program(lambda: train(config(), tmp_path, train_data=data(), val_batches=[],
                                                hooks=Hooks(on_step_end=at_3)))
    assert status is None and result.status == "interrupted" and result.step == 3
    assert f"{signal.Signals(sig).name} received: saved {tmp_path / 'checkpoints' / '3'} at step 3" in \
        capsys.readouterr().out
    assert steps_on_disk(tmp_path)[-1] == 3 and not (tmp_path / ".lock").exists()
    assert signal.getsignal(sig) is before  # the program's handlers are restored
    resume_and_check(tmp_path, ref_losses, first=4)


# --- kill -9 while a checkpoint is being written, and a busy work dir -----------------------------------------

_KILLED_CHILD = textwrap.dedent("""
    import asyncio, json, sys
    sys.path.insert(0, {root!r})
    from orbax.checkpoint._src.path import atomicity
    from specdiff_jax.training import Hooks, train
    from tests import test_faults as t

    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):  # step 4's data is written; its commit (marker + rename) never happens
        if self.get_final().name == "4":
            print("SAVING 4", flush=True)
            await asyncio.sleep(600)
        return await real(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    train(t.config(), {workdir!r}, train_data=t.data(), val_batches=[],
          hooks=Hooks(on_step_end=lambda s, m: print("LOSS", json.dumps([s, m["loss"]]), flush=True)))
""")


def test_kill_9_during_a_save_keeps_the_previous_checkpoint_and_resume_is_exact(ref, tmp_path):
    ref_losses, _ = ref
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD.format(root=str(ROOT), workdir=str(workdir))],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    child_losses, saving = {}, False
    watchdog = threading.Timer(300, proc.kill)  # a child that never reaches the save fails the test, not hangs it
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith("LOSS"):
                s, loss = json.loads(line.split(" ", 1)[1])
                child_losses[s] = loss
            if line.startswith("SAVING 4"):
                saving = True
                break
        assert saving, f"child exited early with status {proc.poll()}"
        # A second run on the live run's work dir is refused before any work.
        with pytest.raises(TrainingError, match=rf"is in use by process {proc.pid}"):
            train(config(), workdir, train_data=data(), val_batches=[])
        proc.kill()  # SIGKILL while step 4's checkpoint is half-committed
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert partial_on_disk(workdir) == ["4.orbax-checkpoint-tmp"]  # the partial save, on disk
    assert steps_on_disk(workdir)[-1] == 3  # ... and not a checkpoint
    assert (workdir / ".lock").read_text().strip() == str(proc.pid)  # a stale lock of the dead process
    # Same seed, another process: the losses it reached are bit-identical to this process's.
    assert child_losses and all(child_losses[s] == ref_losses[s] for s in child_losses), child_losses
    # Resume: the partial checkpoint is ignored (and removed), the stale lock taken over, the losses exact.
    resume_and_check(workdir, ref_losses, first=4)
    assert steps_on_disk(workdir) == [4, 5, 6]


# --- a full disk during a save --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_full_disk_during_a_save_stops_the_run_and_keeps_earlier_checkpoints(ref, tmp_path, monkeypatch, capsys):
    """ENOSPC injected where the step-4 checkpoint's files are written (the JSON items, after the arrays)."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

    ref_losses, _ = ref
    real = jh.JsonCheckpointHandler._save_fn

    async def no_space(self, x, directory):
        if "4.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await real(self, x, directory)

    monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", no_space)
    status, _ = run_program(lambda: train(config(), tmp_path, train_data=data(), val_batches=[]))
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: saving the checkpoint of step 4 ") and "failed (disk full)" in err, err
    assert "No space left on device" in err
    assert f"the last complete checkpoint, {tmp_path / 'checkpoints' / '3'} (step 3), is intact" in err
    assert "rerun the same command to resume" in err
    assert steps_on_disk(tmp_path) == [1, 2, 3] and not (tmp_path / ".lock").exists()
    monkeypatch.undo()  # the disk has room again
    resume_and_check(tmp_path, ref_losses, first=4)


# --- non-finite losses ----------------------------------------------------------------------------------------


def test_nan_loss_from_bad_data_stops_naming_step_and_checkpoint_and_resume_is_exact(ref, tmp_path):
    ref_losses, _ = ref
    with pytest.raises(TrainingDiverged) as e:
        train(config(), tmp_path, train_data=data(bad_step=NAN_STEP), val_batches=[])
    msg = str(e.value)
    assert f"loss is nan at step {NAN_STEP}" in msg
    assert f"last good checkpoint is {tmp_path / 'checkpoints' / str(NAN_STEP - 1)} (step {NAN_STEP - 1}), kept" in msg
    assert steps_on_disk(tmp_path)[-1] == NAN_STEP - 1 and not (tmp_path / ".lock").exists()
    resume_and_check(tmp_path, ref_losses, first=NAN_STEP)  # with the data fixed


def test_inf_loss_stops_the_run(ref, tmp_path, monkeypatch):
    """An infinite loss (injected into the step's metrics of the compiled program) is refused like NaN."""
    real = training.programs

    def with_inf(*a, **kw):
        prog = real(*a, **kw)

        def step(state, batch, *rest):
            state, metrics = prog.train_step(state, batch, *rest)
            inf = jnp.where(state["step"] == 2, jnp.inf, metrics["loss"])
            return state, {**metrics, "loss": inf}

        return dataclasses.replace(prog, train_step=step)

    monkeypatch.setattr(training, "programs", with_inf)
    with pytest.raises(TrainingDiverged, match=r"loss is inf at step 2; the last good checkpoint is .*/1 \(step 1\)"):
        train(config(), tmp_path, train_data=data(), val_batches=[])
    assert steps_on_disk(tmp_path) == [1]


# --- a damaged checkpoint -------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_checkpoint_is_named_and_the_previous_one_resumes_exactly(ref, tmp_path):
    ref_losses, ref_dir = ref
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    data_files = sorted((p for p in (workdir / "checkpoints" / "6" / "state").rglob("*")
                         if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    big = data_files[-1]
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])  # truncated parameter data
    with pytest.raises(TrainingError, match=r"cannot restore the checkpoint .*/checkpoints/6 .*delete it to resume "
                                            r"from the previous one"):
        train(config(), workdir, train_data=data(), val_batches=[])
    (workdir / "checkpoints" / "5" / "meta" / "metadata").write_bytes(b"\xff\xfe not json")  # damaged metadata
    shutil.rmtree(workdir / "checkpoints" / "6")
    with pytest.raises(TrainingError, match=r"cannot read the checkpoint .*/checkpoints/5"):
        train(config(), workdir, train_data=data(), val_batches=[])
    shutil.rmtree(workdir / "checkpoints" / "5")
    resume_and_check(workdir, ref_losses, first=5)  # from checkpoint 4: steps 5 and 6 exactly as before
