"""Runs that survive what happens to long jobs: preemption (SIGTERM), a diverging loss, a damaged
checkpoint, and flags or workdirs that cannot work, each answered in one sentence."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import TINY_FCN, tiny_config

from flaxseg.serving import checkpoints
from flaxseg.training import evaluation, loop

pytestmark = pytest.mark.slow  # trains and kills train.py processes

REPO = Path(__file__).resolve().parents[1]


def _checksums(directory: Path) -> dict:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_sigterm_finishes_the_step_saves_and_exits_0(data_dir, tmp_path):
    workdir = tmp_path / "wd"
    args = [
        sys.executable,
        "train.py",
        "--model=fcn8s",
        "--dataset=synthetic",
        f"--data_dir={data_dir}",
        f"--workdir={workdir}",
        "--steps=100000",
        "--batch_size=2",
        "--crop_size=48",
        f"--model_kwargs={TINY_FCN}",
        "--config.progress_bar=False",
        "--config.log_every=1",
        "--config.eval_every=100000",
        "--config.checkpoint_every=100000",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in process.stdout:  # wait until training runs
        if line.startswith("step 2:"):
            break
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("Stopped by SIGTERM at step ") and "Run the same command" in last
    step = int(last.split("at step ")[1].split(";")[0])
    assert step >= 2
    restored_step, restored = checkpoints.restore_workdir(workdir)
    assert restored_step == step and int(restored["state"]["step"]) == step
    assert restored["data"]  # the input pipeline's position, for an exact resume


def test_diverging_run_stops_and_leaves_the_last_checkpoint_untouched(data_dir, tmp_path):
    loop.train_and_evaluate(tiny_config(data_dir, steps=2, checkpoint_every=2), tmp_path)
    before = _checksums(tmp_path / "checkpoints")
    with pytest.raises(
        loop.NonFiniteError,
        match=(
            r"Training diverged at step \d+: the loss or a gradient is not finite; the last good "
            r"checkpoint is step 2 in .*checkpoints \(left untouched\).*skip_nonfinite"
        ),
    ):
        loop.train_and_evaluate(tiny_config(data_dir, steps=8, lr=1e30), tmp_path)
    assert _checksums(tmp_path / "checkpoints") == before

    # Skipping instead: the run finishes with finite parameters and counts the skips.
    summary = loop.train_and_evaluate(
        tiny_config(data_dir, steps=8, lr=1e30, skip_nonfinite=True, log_every=1),
        tmp_path / "skipping",
    )
    assert summary["step"] == 8 and sum(h["nonfinite"] for h in summary["history"]) > 0
    _, restored = checkpoints.restore_workdir(tmp_path / "skipping")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["state"]))


def _damage_latest(workdir: Path, step: int) -> Path:
    """Truncates every array data file of the step's state (OCDBT's ``d/`` files) to a third.

    Damaging only the largest file was flaky: which array lands in which data file varies from
    run to run, and evaluation restores only parameters and BatchNorm statistics, so a file that
    held only optimiser state left the checkpoint evaluable. Returns the largest damaged file."""
    state = workdir / "checkpoints" / str(step) / "state"
    files = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data files under {state}"
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    return max(files, key=lambda p: p.stat().st_size)


def test_damaged_newest_checkpoint_falls_back_to_an_intact_one(data_dir, tmp_path, capsys):
    loop.train_and_evaluate(tiny_config(data_dir, steps=4, checkpoint_every=2), tmp_path)
    victim = _damage_latest(tmp_path, 4)
    damaged = _checksums(tmp_path / "checkpoints" / "4")

    evaluated = evaluation.evaluate_workdir(tmp_path)  # eval.py --checkpoint=latest
    out = capsys.readouterr().out
    assert evaluated["step"] == 2
    assert "Checkpoint step 4 in" in out and "could not be restored" in out
    with pytest.raises(ValueError, match=r"Checkpoint step 4 in .* could not be restored"):
        evaluation.evaluate_workdir(tmp_path, checkpoint="4")

    summary = loop.train_and_evaluate(tiny_config(data_dir, steps=6, checkpoint_every=2), tmp_path)
    out = capsys.readouterr().out
    assert "Resumed from" in out and "at step 2." in out and summary["step"] == 6
    moved = tmp_path / "checkpoints_damaged" / "4"
    assert f"Moved it to {moved}" in out
    assert _checksums(moved) == damaged  # kept, byte for byte, never deleted
    assert victim.name in {p.name for p in moved.rglob("*")}


def test_workdir_that_is_a_file_is_refused_before_set_up(data_dir, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("not a directory")
    with pytest.raises(FileExistsError, match=r"--workdir=.*a_file is an existing file"):
        loop.train_and_evaluate(tiny_config(data_dir), target)
    assert target.read_text() == "not a directory"


def test_config_field_typo_gets_one_sentence_with_suggestions(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", f"--workdir={tmp_path}", "--config.lr_shedule=step"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "train.py: error: --config.lr_shedule names no config field; did you mean "
        "--config.lr_schedule?"
    ]
    assert json.dumps(sorted(os.listdir(tmp_path))) == "[]"


def _train_command(data_dir, workdir):
    return [
        sys.executable,
        "train.py",
        "--model=fcn8s",
        "--dataset=synthetic",
        f"--data_dir={data_dir}",
        f"--workdir={workdir}",
        "--steps=8",
        "--batch_size=2",
        "--crop_size=48",
        f"--model_kwargs={TINY_FCN}",
        "--config.progress_bar=False",
        "--config.checkpoint_every=2",
        "--config.eval_every=100000",
    ]


def _final_params(workdir):
    step, restored = checkpoints.restore_workdir(workdir)
    assert step == 8
    return jax.tree.leaves((restored["state"]["params"], restored["state"]["opt_state"]))


def test_sigkill_at_any_point_resumes_bit_identically(data_dir, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    straight = subprocess.run(
        _train_command(data_dir, tmp_path / "straight"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = _final_params(tmp_path / "straight")
    for point in ("mid_step:5", "mid_save:4", "after_save:4"):
        workdir = tmp_path / point.replace(":", "_")
        killed = subprocess.run(
            _train_command(data_dir, workdir),
            cwd=REPO,
            timeout=600,
            env={**env, "FLAXSEG_TEST_KILL": point},
            capture_output=True,
        )
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        resumed = subprocess.run(
            _train_command(data_dir, workdir),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert resumed.returncode == 0, (point, resumed.stderr[-2000:])
        assert "Resumed from" in resumed.stdout, point
        for a, b in zip(expected, _final_params(workdir)):
            assert np.array_equal(np.asarray(a), np.asarray(b)), point  # bit for bit


def test_an_unfinished_save_is_ignored_with_a_note(data_dir, tmp_path, capsys):
    loop.train_and_evaluate(tiny_config(data_dir, steps=2, checkpoint_every=2), tmp_path)
    unfinished = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "half_written").write_bytes(b"\0" * 10)
    summary = loop.train_and_evaluate(tiny_config(data_dir, steps=4, checkpoint_every=2), tmp_path)
    out = capsys.readouterr().out
    assert f"Ignored {unfinished}: a save that never finished" in out
    assert "at step 2." in out and summary["step"] == 4
    assert (unfinished / "state" / "half_written").read_bytes() == b"\0" * 10


def test_evaluation_reads_only_the_variables(data_dir, tmp_path, monkeypatch):
    loop.train_and_evaluate(tiny_config(data_dir, steps=2, checkpoint_every=2), tmp_path)
    seen = []
    original = checkpoints.restore_variables

    def spy(manager, step, abstract, sharding):
        restored = original(manager, step, abstract, sharding)
        seen.append(sorted(restored["state"]))
        return restored

    monkeypatch.setattr(checkpoints, "restore_variables", spy)
    assert evaluation.evaluate_workdir(tmp_path)["step"] == 2
    assert seen == [["params"]]  # this FCN has no BatchNorm; no optimiser state, no step


def test_out_of_memory_gets_one_sentence_with_a_hint(capsys):
    import jax.numpy as jnp

    from flaxseg.training import cli

    def too_big():  # 4 TiB: XLA refuses the allocation with RESOURCE_EXHAUSTED
        return jax.jit(lambda: jnp.ones((1 << 40,), jnp.float32))()

    with pytest.raises(SystemExit) as exit_info:
        cli.run_or_exit("train.py", too_big)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: the device ran out of memory")
    assert "--batch_size" in lines[0] and "--crop_size" in lines[0]
    assert "--config.remat=True" in lines[0]


def test_unwritable_workdir_is_refused_before_set_up(data_dir, tmp_path, monkeypatch):
    # Root (as in CI) may write anywhere, so the permission answer is simulated.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=r"--workdir=.*wd is not writable"):
        loop.train_and_evaluate(tiny_config(data_dir), tmp_path / "wd")
    assert not (tmp_path / "wd").exists()
