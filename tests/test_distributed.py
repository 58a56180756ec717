"""Multi-process training: two train.py processes on localhost (jax.distributed over gloo, 2 CPU
devices each) train like one process with the same 4 devices and global batch, write each
checkpoint once, and a one-process run evaluates and resumes it; eval.py over two processes
gives the same mIoU; a coordinator that is never reached ends a process within its timeout in
one sentence; bad flag combinations are refused in one sentence.

The tiny U-Net has BatchNorm (its batch statistics are then global over both processes) and no
dropout: dropout masks follow a row's position in the global batch, and the two processes
assemble the same examples in another row order (process k holds global examples k, k+2, ...).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import xla_flags

from flaxseg.serving import checkpoints
from flaxseg.training import distributed

pytestmark = pytest.mark.slow  # runs train.py in several processes

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = json.dumps({"base_channels": 4, "batchnorm": True, "dropout_rate": 0.0})
LIMIT_S = 300  # any one subprocess; a hang fails the test instead of blocking the suite


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(devices: int) -> dict:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": xla_flags(devices),
    }


def _train_args(data_dir, workdir, steps: int) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "--model=unet",
        f"--model_kwargs={TINY_UNET}",
        "--dataset=synthetic",
        f"--data_dir={data_dir}",
        f"--workdir={workdir}",
        f"--steps={steps}",
        "--batch_size=4",
        "--crop_size=32",
        "--config.lr_schedule=constant",  # so a 3-step and a 4-step run share their first steps
        "--config.eval_batch_size=4",
        "--config.eval_bucket_multiple=160",  # synthetic images are ≤ 160 px: one eval shape
        "--config.eval_every=3",
        "--config.checkpoint_every=3",
        "--config.log_every=1",
        "--config.progress_bar=False",
    ]


def _run_all(commands: list[tuple[list[str], dict]], timeout: float = LIMIT_S):
    """Runs the commands at the same time; [(returncode, stdout, stderr)], or kills them all."""
    processes = [
        subprocess.Popen(
            args,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, env in commands
    ]
    try:
        deadline = time.monotonic() + timeout
        outputs = [p.communicate(timeout=max(1, deadline - time.monotonic())) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]


def _two_processes(args: list[str], devices: int = 2, timeout: float = LIMIT_S):
    coordinator = [f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2"]
    return _run_all(
        [([*args, *coordinator, f"--process_id={i}"], _env(devices)) for i in range(2)], timeout
    )


def _without_gloo(stdout: str) -> str:
    """stdout less gloo's C++ notices ("[Gloo] Rank 1 is connected to 3 peer ranks. Expected
    number of connected peer ranks is : 3"), which its threads write in interleaved pieces."""
    pieces = r"\[Gloo\]|Rank|is connected to|Expected number of connected|peer ranks( is :|\.)|\d+"
    return re.sub(pieces, "", stdout).strip()


def _variables(workdir, step: int) -> dict:
    _, restored = checkpoints.restore_workdir(workdir, str(step))
    return {k: restored["state"][k] for k in ("params", "batch_stats")}


def _max_difference(a, b) -> float:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _miou(workdir, step: int) -> float:
    manager = checkpoints.create_manager(workdir, read_only=True)
    return manager.metrics(step)["miou"]


def test_two_processes_train_like_one_and_a_single_process_resumes(tmp_path):
    data_dir = tmp_path / "tfds"  # built by the two-process run itself: process 0 first
    two = tmp_path / "two"
    (rc0, out0, err0), (rc1, out1, err1) = _two_processes(_train_args(data_dir, two, steps=3))
    assert rc0 == 0, err0[-3000:]
    assert rc1 == 0, err1[-3000:]
    assert "Traceback" not in err0 + err1

    # Process 0 logs; process 1 prints nothing of flaxseg's (gloo's C++ connection notices go to
    # every process's stdout and cannot be turned off).
    lines0 = out0.splitlines()
    assert "unet: " in out0 and "4 device(s), global batch 4" in out0
    assert any(line.startswith("step 3: train/") for line in lines0)
    assert any(line.startswith("step 3: val/") for line in lines0)
    assert lines0[-1].startswith("mIoU: 0.")
    assert _without_gloo(out1) == ""
    assert len(list((two / "tensorboard").iterdir())) == 1  # written by process 0 alone

    # Each checkpoint once, complete: one directory per step, no leftovers of a second writer.
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["3"]
    assert sorted(p.name for p in (two / "checkpoints" / "3").iterdir()) == sorted(
        ["_CHECKPOINT_METADATA", "commit_success.txt", "data", "meta", "metrics", "state"]
    )

    # One process with the same 4 devices and global batch; eval.py (one process, one device)
    # on the two-process checkpoint; one process (one device) resuming the two-process run.
    one, resumed = tmp_path / "one", tmp_path / "resumed"
    shutil.copytree(two, resumed)
    (rc, _, err), (rc_eval, out_eval, err_eval), (rc_resume, out_resume, err_resume) = _run_all(
        [
            (_train_args(data_dir, one, steps=4), _env(4)),
            ([sys.executable, "eval.py", f"--workdir={two}"], _env(1)),
            (_train_args(data_dir, resumed, steps=4), _env(1)),
        ]
    )
    assert rc == 0, err[-3000:]
    assert _max_difference(_variables(two, 3), _variables(one, 3)) <= 1e-5
    # The validation confusion matrix is summed over both processes' shares of the images.
    assert _miou(two, 3) == pytest.approx(_miou(one, 3), abs=1e-6)

    assert rc_eval == 0, err_eval[-3000:]
    assert out_eval.splitlines()[0].startswith("checkpoint step 3,")
    assert out_eval.splitlines()[-1] == lines0[-1]  # the same mIoU from the restored model

    assert rc_resume == 0, err_resume[-3000:]
    assert f"Resumed from {resumed / 'checkpoints'} at step 3." in out_resume
    assert out_resume.splitlines()[-1].startswith("mIoU: 0.")
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["3", "4"]
    # The saved input position is converted to the new process count: the resumed step 4 sees
    # the same global batch as the uninterrupted one-process run's step 4.
    assert _max_difference(_variables(resumed, 4), _variables(one, 4)) <= 1e-5

    # eval.py over two processes: each evaluates its share, the confusion matrix is summed.
    (rc0, out0, err0), (rc1, out1, err1) = _two_processes(
        [sys.executable, "eval.py", f"--workdir={two}"]
    )
    assert (rc0, rc1) == (0, 0), (err0[-3000:], err1[-3000:])
    assert out0.splitlines()[-1] == lines0[-1]
    assert _without_gloo(out1) == ""


def test_unreachable_coordinator_fails_in_time_with_one_sentence(tmp_path):
    timeout_s = 5

    def train(address, num_processes, process_id):
        args = [sys.executable, "train.py", f"--workdir={tmp_path / 'wd'}"]
        args += [f"--coordinator_address={address}", f"--num_processes={num_processes}"]
        args += [f"--process_id={process_id}", f"--distributed_timeout={timeout_s}"]
        return args, _env(1)

    nobody, lonely = (f"127.0.0.1:{_free_port()}" for _ in range(2))
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        start = time.monotonic()
        # Process 1 finds no coordinator; process 0 runs one, but the 2 others never come;
        # process 0 finds its port taken.
        (rc1, _, err1), (rc0, _, err0), (rc_busy, _, err_busy) = _run_all(
            [train(nobody, 2, 1), train(lonely, 3, 0), train(busy, 2, 0)], timeout=120
        )
        elapsed = time.monotonic() - start
    # JAX alone aborts only after 2 × its 300 s default, with a C++ stack trace.
    assert elapsed < timeout_s + 45, elapsed
    assert (rc1, rc0, rc_busy) == (2, 2, 2), (err1[-2000:], err0[-2000:], err_busy[-2000:])
    for err in (err1, err0, err_busy):
        assert "Traceback" not in err and "Check failure" not in err, err[-2000:]
    assert err1.strip().splitlines()[-1] == (
        f"train.py: error: Could not reach the coordinator at {nobody} within {timeout_s} s "
        "(process 1 of 2: connection refused); check --coordinator_address (process 0's "
        "address and port) and that process 0 runs."
    )
    assert err0.strip().splitlines()[-1] == (
        f"train.py: error: Not all 3 processes joined the coordinator at {lonely} within "
        f"{timeout_s} s (this is process 0, which runs it); start all 3 processes with the same "
        "--coordinator_address and --num_processes, or raise --distributed_timeout."
    )
    assert err_busy.strip().splitlines()[-1] == (
        f"train.py: error: Process 0 could not start the coordinator at {busy} (the port is in "
        f"use); is port {busy.split(':')[1]} free on this machine? Choose another in "
        "--coordinator_address."
    )
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            dict(num_processes=2),
            "--num_processes=2 needs --coordinator_address and --process_id as well: a "
            "multi-host run takes all three of --coordinator_address, --num_processes, "
            "--process_id, a one-process run none.",
        ),
        (
            dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0),
            "--coordinator_address='10.0.0.1' is not HOST:PORT (process 0's address and a free "
            "port, e.g. 10.0.0.1:1234).",
        ),
        (
            dict(coordinator_address="host:99999", num_processes=2, process_id=0),
            "--coordinator_address='host:99999' is not HOST:PORT",
        ),
        (
            dict(coordinator_address="host:1234", num_processes=0, process_id=0),
            "--num_processes=0 must be at least 1.",
        ),
        (
            dict(coordinator_address="host:1234", num_processes=2, process_id=2),
            "--process_id=2 must be one of 0 .. 1 (--num_processes=2).",
        ),
        (
            dict(coordinator_address="host:1234", num_processes=2, process_id=-1),
            "--process_id=-1 must be one of 0 .. 1",
        ),
        (dict(timeout_s=0), "--distributed_timeout=0 must be a positive number of seconds."),
    ],
)
def test_bad_flags_are_refused_in_one_sentence(flags, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        distributed.initialize(**flags)


def test_cloud_tpu_is_initialised_without_flags(monkeypatch):
    """On a Cloud TPU VM (as JAX detected it on import) no flags are needed: JAX's own
    initialize() reads the slice's hosts; anywhere else nothing is called."""
    from jax._src import cloud_tpu_init

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert distributed.initialize(timeout_s=7) is False and calls == []
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
    assert distributed.running_on_cloud_tpu()
    assert distributed.initialize(timeout_s=7) is True
    assert calls == [{"initialization_timeout": 37}]


def test_flags_of_a_single_process_run_and_the_entry_point(tmp_path):
    # No flags off Cloud TPU: one process, nothing initialised (this pytest process has JAX's
    # backend up already, which jax.distributed.initialize would refuse).
    assert distributed.check_flags(None, None, None) is None
    assert not distributed.running_on_cloud_tpu()
    assert distributed.initialize() is False
    assert distributed.parse_address("[::1]:8476") == ("::1", 8476)
    ((rc, out, err),) = _run_all(
        [
            (
                [sys.executable, "train.py", f"--workdir={tmp_path}", "--process_id=1"],
                _env(1),
            )
        ]
    )
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        "train.py: error: --process_id=1 needs --coordinator_address and --num_processes as "
        "well: a multi-host run takes all three of --coordinator_address, --num_processes, "
        "--process_id, a one-process run none."
    ]
