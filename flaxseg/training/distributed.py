"""Many processes (hosts): `jax.distributed.initialize` from the entry points' flags, or by itself
on Cloud TPU.

Every process runs the same command with its own ``--process_id``:

    python train.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
    python train.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=1

Process 0 runs the coordinator at that address (its own address and a free port). On a Cloud TPU
VM none of the flags is needed: JAX reads the slice's hosts from the TPU metadata. Without the
flags anywhere else the run is one process and nothing is initialised.

JAX ends a process whose coordinator never answers with a C++ abort and a stack trace, and only
after twice its timeout; here a process that has not joined all the others within ``timeout_s``
ends with one sentence on stderr and exit code 2 instead, and a coordinator that does not accept
connections at all is reported (``TimeoutError``) before JAX is asked to connect.
"""

import errno
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

import jax

DEFAULT_TIMEOUT_S = 120.0
# How long the other processes wait for process 0 to build a dataset (VOC + SBD: minutes).
DATA_BARRIER_TIMEOUT_S = 4 * 3600

T = TypeVar("T")

_LOOPBACK = ("localhost", "127.0.0.1", "::1")
_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")


def define_flags() -> None:
    """The multi-host flags of train.py and eval.py."""
    from absl import flags

    flags.DEFINE_string(
        "coordinator_address",
        None,
        "HOST:PORT of process 0 (its address and a free port) in a multi-host run; with "
        "--num_processes and --process_id. Not needed on Cloud TPU.",
    )
    flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) of the run.")
    flags.DEFINE_integer("process_id", None, "This process's number, 0 .. num_processes - 1.")
    flags.DEFINE_float(
        "distributed_timeout",
        DEFAULT_TIMEOUT_S,
        "Seconds a process waits for the coordinator and the other processes to join.",
    )


def initialize_from_flags(program: Optional[str] = None) -> bool:
    """`initialize` with the values of the flags `define_flags` defined."""
    from absl import flags

    values = flags.FLAGS
    return initialize(
        values.coordinator_address,
        values.num_processes,
        values.process_id,
        timeout_s=values.distributed_timeout,
        program=program,
    )


def parse_address(coordinator_address: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[IPv6]:PORT') -> (host, port); one sentence (ValueError) otherwise."""
    host, _, port = str(coordinator_address).rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"--coordinator_address={coordinator_address!r} is not HOST:PORT (process 0's "
            "address and a free port, e.g. 10.0.0.1:1234)."
        )
    return host, int(port)


def check_flags(
    coordinator_address: Optional[str],
    num_processes: Optional[int],
    process_id: Optional[int],
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Optional[tuple[str, int]]:
    """(host, port) of the coordinator when the three flags are given, None when none is; one
    sentence (ValueError) naming the flag for any other combination or value."""
    values = (coordinator_address, num_processes, process_id)
    if not timeout_s > 0:
        raise ValueError(f"--distributed_timeout={timeout_s} must be a positive number of seconds.")
    if all(value is None for value in values):
        return None
    if any(value is None for value in values):
        given = ", ".join(
            f"{flag}={value}" for flag, value in zip(_FLAGS, values) if value is not None
        )
        missing = " and ".join(flag for flag, value in zip(_FLAGS, values) if value is None)
        raise ValueError(
            f"{given} needs {missing} as well: a multi-host run takes all three of "
            f"{', '.join(_FLAGS)}, a one-process run none."
        )
    address = parse_address(coordinator_address)
    if num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be at least 1.")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process_id={process_id} must be one of 0 .. {num_processes - 1} "
            f"(--num_processes={num_processes})."
        )
    return address


def running_on_cloud_tpu() -> bool:
    """Whether this is a Cloud TPU VM (JAX decides so on import, from the TPU chips attached),
    where `jax.distributed.initialize()` finds the slice's hosts by itself."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # a JAX that moved it: no auto-detection, the flags still work
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    program: Optional[str] = None,
) -> bool:
    """Joins this process to a multi-process run; returns whether one was initialised.

    With the three arguments: `jax.distributed.initialize` with them (CPU collectives over gloo,
    so a CPU-only run spans processes too). Without any: on a Cloud TPU VM
    `jax.distributed.initialize()` (JAX detects the hosts), elsewhere nothing (one process).
    Must run before anything initialises a JAX backend (`jax.devices()`, any computation);
    `jax.config` updates before it are fine.

    Bad arguments raise one sentence (ValueError). A process other than 0 first waits up to
    ``timeout_s`` for the coordinator to accept connections and raises TimeoutError (one
    sentence) if it never does. A process that has not joined all ``num_processes`` within
    ``timeout_s`` in all is ended with exit code 2 and one sentence on stderr, prefixed with
    ``program`` (default: the script's name): JAX would otherwise abort it later with a stack
    trace.
    """
    address = check_flags(coordinator_address, num_processes, process_id, timeout_s)
    if address is None and not running_on_cloud_tpu():
        return False
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    program = program or Path(sys.argv[0]).name
    deadline = time.monotonic() + timeout_s
    if address is None:
        hint = (
            "check that the same command runs on every host of the slice (gcloud ... ssh "
            "--worker=all), or pass --coordinator_address, --num_processes and --process_id"
        )
        arguments = {}
    else:
        hint = (
            f"start all {num_processes} processes with the same --coordinator_address and "
            f"--num_processes, or raise --distributed_timeout"
        )
        arguments = dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        if process_id != 0:
            _wait_for_coordinator(
                *address, deadline, timeout_s, coordinator_address, process_id, num_processes
            )
        elif not _port_is_free(address[1]):  # jaxlib sometimes crashes (SIGSEGV) on a busy port
            raise ConnectionError(
                f"Process 0 could not start the coordinator at {coordinator_address} (the port "
                f"is in use); is port {address[1]} free on this machine? Choose another in "
                "--coordinator_address."
            )
    if address is None:
        message = f"Not every host of this Cloud TPU slice joined within {timeout_s:g} s; {hint}."
    elif process_id != 0:
        message = (
            f"The coordinator at {coordinator_address} was reached, but not every process "
            f"joined it within {timeout_s:g} s (process {process_id} of {num_processes}); {hint}."
        )
    else:
        here = "" if address[0] in _LOOPBACK else f"; is {address[0]} this machine?"
        message = (
            f"Not all {num_processes} processes joined the coordinator at {coordinator_address} "
            f"within {timeout_s:g} s (this is process 0, which runs it{here}); {hint}."
        )
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _give_up, (program, message))
    watchdog.daemon = True
    watchdog.start()
    try:
        # JAX's own deadline lies past the watchdog's, so the watchdog's sentence comes first.
        jax.distributed.initialize(**arguments, initialization_timeout=math.ceil(timeout_s) + 30)
    except (RuntimeError, ValueError, OSError) as error:  # a port in use, no TPU metadata, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if address is None:
            raise ConnectionError(
                f"Could not set up the run across this Cloud TPU slice ({reason}); {hint}."
            ) from None
        if process_id == 0:
            raise ConnectionError(
                f"Process 0 could not start the coordinator at {coordinator_address} ({reason}); "
                f"is port {address[1]} free on this machine? Choose another in "
                "--coordinator_address."
            ) from None
        raise ConnectionError(
            f"Could not join the coordinator at {coordinator_address} (process {process_id} of "
            f"{num_processes}: {reason}); {hint}."
        ) from None
    finally:
        watchdog.cancel()
    return True


def _port_is_free(port: int) -> bool:
    """Whether this machine can listen on `port` (on every interface, as the coordinator does)."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((host, port))
            return True
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            continue  # no IPv6 here: try IPv4
    return True


def _give_up(program: str, message: str) -> None:
    """Ends the process from the watchdog thread, while JAX's connect still blocks the main
    thread (it releases the GIL while it waits)."""
    sys.stderr.write(f"{program}: error: {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(2)


def _wait_for_coordinator(
    host, port, deadline, timeout_s, coordinator_address, process_id, num_processes
):
    """Returns once something accepts TCP connections at host:port; TimeoutError (one sentence)
    at the deadline. The coordinator may start after this process: keep trying until then."""
    reason = "nothing accepted the connection"
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, remaining))):
                return
        except socket.gaierror:
            reason = f"{host} does not resolve"
        except OSError as error:
            reason = (error.strerror or reason).lower()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"Could not reach the coordinator at {coordinator_address} within {timeout_s:g} s "
                f"(process {process_id} of {num_processes}: {reason}); check "
                "--coordinator_address (process 0's address and port) and that process 0 runs."
            )
        time.sleep(min(0.25, remaining))


def process_zero_first(
    fn: Callable[[], T], name: str, timeout_s: float = DATA_BARRIER_TIMEOUT_S
) -> T:
    """``fn()`` on process 0, then, once it returned, on every other process: e.g. building the
    TFDS dataset they all read, which two processes must not write at the same time (on one
    shared disk the others then find it built; on per-host disks each builds its own copy).

    Process 0 releases the others also when ``fn`` raises; they then meet the same error
    themselves, so every process ends with its sentence instead of waiting for one that is gone.
    """
    if jax.process_count() == 1:
        return fn()
    import orbax.checkpoint as ocp

    barrier = ocp.multihost.get_barrier_sync_fn()
    key, timeout_ms = f"flaxseg_{name}_first", int(timeout_s * 1000)
    if jax.process_index() == 0:
        try:
            return fn()
        finally:
            barrier(key=key, timeout_ms=timeout_ms)
    barrier(key=key, timeout_ms=timeout_ms)
    return fn()


def prepare_dataset(config) -> None:
    """In a multi-process run, builds the configured dataset (if it is not built yet) on process
    0 before the other processes open it; a one-process run builds it on first use anyway."""
    if jax.process_count() == 1:
        return
    from flaxseg import data as data_lib

    process_zero_first(
        lambda: data_lib.get_data_source(
            config.dataset,
            "train",
            data_dir=config.data_dir or None,
            manual_dir=config.manual_dir or None,
        ),
        "dataset",
    )
