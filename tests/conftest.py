"""Shared pytest setup: a persistent XLA compilation cache so repeated runs compile once, and
the session fixtures (the synthetic data directory, a tiny trained run) of tests/helpers.py."""

import os

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.expanduser("~"), ".cache", "flaxseg_jax_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA:CPU's LLVM back end at -O0: on CPU, compiling dominates these tests (tiny inputs), and -O0
# compiles a train step ~2x and an ``init`` ~5x faster. It changes how XLA's fused loops are
# optimised into machine code, not the HLO (fusion, layouts) nor the library calls that do
# convolutions and matmuls: the numbers are the library's up to float32 rounding (a loop may sum
# in another order), which tests/test_compile_flags.py checks against the default back end; the
# parity tolerances (1e-4) are far above it. Set before jax starts;
# train.py processes that tests launch inherit it. FLAXSEG_TEST_XLA_OPT=default turns it off.
if os.environ.get("FLAXSEG_TEST_XLA_OPT", "O0") == "O0":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)

import pytest  # noqa: E402
from helpers import train_tiny_workdir  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The TFDS data directory of the session: the synthetic set is built into it once, on the
    first test that reads it, and every training test after that reads the same build."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, data_dir):
    """A finished 2-step run of a tiny U-Net (BatchNorm, so batch_stats are restored too) on the
    synthetic set, trained once per session, for the tests that only need a run directory
    (predict, export). Tests must not write into it."""
    return train_tiny_workdir(tmp_path_factory.mktemp("trained") / "unet", data_dir)
