"""Stopping a run cleanly when the machine is taken away.

Cloud preemption sends SIGTERM with a short grace period; a user presses Ctrl-C (SIGINT). The
first such signal only sets a flag: the loop finishes the step it is in, writes a checkpoint,
waits for Orbax to commit it and returns, so the same command resumes exactly. A second signal
exits at once (status 128 + signal), as a user pressing Ctrl-C twice expects.
"""

import contextlib
import os
import signal
import threading

from flaxseg.training import reporting

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Set by the first SIGTERM/SIGINT; ``signal_name`` says which."""

    def __init__(self):
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGTERM/SIGINT set the yielded ``StopRequest`` instead of killing the
    process (only in the main thread, where Python can install handlers)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, frame):
        del frame
        if request.requested:  # the second signal: leave now
            os._exit(128 + signum)
        request.signal_name = signal.Signals(signum).name
        reporting.say(
            f"Received {request.signal_name}: finishing the current step and saving a "
            "checkpoint (send it again to exit at once)."
        )

    previous = {signum: signal.signal(signum, handle) for signum in SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# Fault injection for the resume tests (tests/test_reliability.py): FLAXSEG_TEST_KILL=<point>:<step>
# SIGKILLs this process at that point of that step — 'mid_step' (the step computed, nothing
# saved), 'mid_save' (a SIGKILL a few milliseconds into the checkpoint's save, from a timer
# thread) or 'after_save' (the checkpoint committed). Unset in normal runs: nothing happens.
TEST_KILL_VARIABLE = "FLAXSEG_TEST_KILL"


def test_kill_point(point: str, step: int) -> None:
    wanted = os.environ.get(TEST_KILL_VARIABLE)
    if not wanted or wanted != f"{point}:{step}":
        return
    if point == "mid_save":
        threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGKILL)).start()
    else:
        os.kill(os.getpid(), signal.SIGKILL)
