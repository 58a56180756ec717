"""export.py: the inference function (normalisation included) serialised with jax.export, reloaded
by `flaxseg.export.load` in a fresh process that never imports flaxseg.models or flax, equal to
the model on the input pipeline's normalisation at two batch sizes; one sentence for each
setting that cannot be exported."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import reference_logits

from flaxseg import export
from flaxseg.serving import export as exporting
from flaxseg.serving import restore

pytestmark = pytest.mark.slow  # trains a run once per session, reloads exports in new processes

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 37, 53


@pytest.fixture(scope="module")
def workdir(trained_workdir):
    return trained_workdir


@pytest.fixture(scope="module")
def restored(workdir):
    return restore.restore_model(workdir, rgb=True)


RELOAD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from flaxseg import export

    model = export.load(sys.argv[1])
    for batch in sys.argv[3:]:
        images = np.load(f"{sys.argv[2]}/images_{batch}.npy")
        np.save(f"{sys.argv[2]}/logits_{batch}.npy", np.asarray(model(images)))
    print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "flaxseg"))))
    """
)


def test_reloaded_in_a_fresh_process_equals_the_model(workdir, restored, tmp_path):
    out = tmp_path / "unet.jax"
    metadata = exporting.export_workdir(workdir, out, height=HEIGHT, width=WIDTH)
    assert metadata["input"]["shape"] == ["batch", HEIGHT, WIDTH, 3]
    assert metadata["output"]["shape"] == ["batch", HEIGHT, WIDTH, 21]
    assert metadata["class_names"][15] == "person" and metadata["step"] == 2
    assert json.loads(Path(f"{out}.json").read_text()) == metadata
    # The file is exactly jax.export's serialisation.
    assert jax.export.deserialize(bytearray(out.read_bytes())).in_avals[0].dtype == jnp.uint8

    rng = np.random.default_rng(0)
    batches = (1, 3)
    for batch in batches:
        images = rng.integers(0, 256, (batch, HEIGHT, WIDTH, 3), dtype=np.uint8)
        np.save(tmp_path / f"images_{batch}.npy", images)
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out), str(tmp_path), *map(str, batches)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.strip().splitlines()[-1].split(",")  # no models, no flax
    assert loaded == ["flaxseg", "flaxseg.export", "flaxseg.serving", "flaxseg.serving.loader"]
    for batch in batches:
        images = np.load(tmp_path / f"images_{batch}.npy")
        reloaded = np.load(tmp_path / f"logits_{batch}.npy")
        expected = np.stack([reference_logits(restored, image) for image in images])
        assert reloaded.dtype == np.float32 and reloaded.shape == (batch, HEIGHT, WIDTH, 21)
        np.testing.assert_allclose(reloaded, expected, atol=1e-5, rtol=0)

    model = export.load(out)
    assert model.input_shape == (None, HEIGHT, WIDTH, 3) and model.num_classes == 21
    assert model.class_names[0] == "background" and tuple(model.colormap[1]) == (128, 0, 0)
    with pytest.raises(ValueError, match=r"takes uint8 images of shape \[\?, 37, 53, 3\], got"):
        model(np.zeros((1, HEIGHT + 1, WIDTH, 3), np.uint8))
    with pytest.raises(ValueError, match=r"takes uint8 images .* got float32"):
        model(np.zeros((1, HEIGHT, WIDTH, 3), np.float32))


def test_cli_fixed_batch_and_refusals(workdir, restored, tmp_path):
    out = tmp_path / "fixed.jax"
    command = [sys.executable, str(REPO / "export.py"), f"--workdir={workdir}", f"--out={out}"]
    result = subprocess.run(
        [*command, "--batch_size=2", f"--height={HEIGHT}", f"--width={WIDTH}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (uint8 [2, {HEIGHT}, {WIDTH}, 3] -> float32 logits" in result.stdout
    model = export.load(out)
    images = np.random.default_rng(1).integers(0, 256, (2, HEIGHT, WIDTH, 3), dtype=np.uint8)
    expected = np.stack([reference_logits(restored, image) for image in images])
    np.testing.assert_allclose(np.asarray(model(images)), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"shape \[2, 37, 53, 3\]"):
        model(images[:1])

    # U-Net's crops need concrete sizes: symbolic height and width are refused in one sentence.
    with pytest.raises(ValueError) as error:
        exporting.export_workdir(workdir, tmp_path / "symbolic.jax")
    message = str(error.value)
    assert message.startswith("Model unet cannot be exported with a symbolic height and width (")
    assert message.endswith("; pass --height and --width.") and "\n" not in message
    for flags, sentence in (
        ({"height": HEIGHT}, "Pass both --height and --width, or neither"),
        ({"height": 0, "width": 5}, "--height must be a positive integer, got 0."),
        ({"platforms": ["cpu", "gpu"]}, "--platforms=cpu,gpu must name some of cpu, cuda"),
    ):
        with pytest.raises(ValueError, match=f"^{sentence}"):
            exporting.export_workdir(workdir, tmp_path / "x.jax", **flags)
    with pytest.raises(ValueError, match=r"is a folder; give a file name"):
        exporting.export_workdir(workdir, tmp_path, height=HEIGHT, width=WIDTH)


class _BatchDependent(nn.Module):
    """Python that branches on the batch size, as DeepLab's image pooling does."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(2, (1, 1))(x)
        return x * 2 if x.shape[0] > 1 else x


def test_symbolic_batch_refusal_names_the_flag():
    model = _BatchDependent()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError) as error:
        exporting.export_inference(model, variables, height=4, width=4, name="Model toy")
    message = str(error.value)
    assert message.startswith("Model toy cannot be exported with a symbolic batch size (")
    assert message.endswith("; pass --batch_size.")
    exported = exporting.export_inference(model, variables, height=4, width=4, batch_size=3)
    assert exported.in_avals[0].shape == (3, 4, 4, 3)
    # Multi-platform lowering needs no device of the other platform.
    both = exporting.export_inference(
        model, variables, height=4, width=4, batch_size=1, platforms=["cpu", "cuda"]
    )
    assert both.platforms == ("cpu", "cuda")


def test_load_refuses_what_export_did_not_write(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"^Exported model .*none.jax does not exist\."):
        export.load(tmp_path / "none.jax")
    (tmp_path / "junk.jax").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"junk.jax is not a model written by export.py"):
        export.load(tmp_path / "junk.jax")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # TensorFlow absent, as in CI
    with pytest.raises(
        ValueError, match=r"^--saved_model needs TensorFlow, which is not installed"
    ):
        exporting.export_workdir("unused", tmp_path / "m.jax", saved_model=str(tmp_path / "tf"))
