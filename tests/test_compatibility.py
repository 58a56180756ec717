"""A checkpoint restored into a model it does not fit (another model, backbone, class count,
input channels or parameter dtype; arrays of other shapes) is refused in one sentence, read from
the recorded spec or the checkpoint's metadata before any array, and the workdir is untouched
(same bytes, same modification times)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import TINY_FCN, tiny_config

from flaxseg.serving import checkpoints
from flaxseg.serving.restore import build_model
from flaxseg.training import checkpointing, evaluation, loop
from flaxseg.training import spec as spec_lib

pytestmark = pytest.mark.slow  # trains and restores runs


def _fingerprint(directory: Path) -> dict:
    """{path: (sha256, mtime)} of every file, {path: None} of every folder."""
    return {
        str(p.relative_to(directory)): (
            (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            if p.is_file()
            else None
        )
        for p in sorted(directory.rglob("*"))
    }


def _config(data_dir, **overrides):
    return tiny_config(
        data_dir, **{"crop_size": 48, "steps": 2, "checkpoint_every": 2, **overrides}
    )


def _kwargs(**extra) -> str:
    return json.dumps({**json.loads(TINY_FCN), **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A finished 2-step run of a tiny FCN-8s (VGG-16, 21 classes, RGB, float32)."""
    workdir = tmp_path_factory.mktemp("fcn8s")
    loop.train_and_evaluate(_config(data_dir), workdir)
    return data_dir, workdir


@pytest.mark.parametrize(
    "overrides, difference",
    [
        ({"model": "fcn32s"}, "model='fcn8s' (requested 'fcn32s')"),
        ({"backbone": "vgg16_bn"}, "backbone='vgg16' (requested 'vgg16_bn')"),
        ({"num_classes": 5}, "num_classes=21 (requested 5)"),
        ({"model_kwargs": _kwargs(in_channels=1)}, "in_channels=3 (requested 1)"),
        (
            {"model_kwargs": _kwargs(param_dtype="bfloat16")},
            "param_dtype='float32' (requested 'bfloat16')",
        ),
    ],
)
def test_resuming_into_another_model_is_refused_and_the_workdir_untouched(
    trained, overrides, difference
):
    data_dir, workdir = trained
    before = _fingerprint(workdir)
    with pytest.raises(ValueError) as error:
        loop.train_and_evaluate(_config(data_dir, steps=4, **overrides), workdir)
    assert str(error.value) == (
        f"Workdir {workdir} holds a checkpoint of a different model: {difference}; it was left "
        "untouched: pass a new --workdir or the same model settings."
    )
    assert _fingerprint(workdir) == before


@pytest.mark.parametrize(
    "overrides, held, wanted, words",
    [
        ({"backbone": "vgg16_bn"}, "backbone='vgg16'", "backbone='vgg16_bn'", "backbone"),
        ({"num_classes": 5}, "num_classes=21", "num_classes=5", "classes"),
        (
            {"model_kwargs": _kwargs(param_dtype="bfloat16")},
            "param_dtype='float32'",
            "param_dtype='bfloat16'",
            "parameter dtype",
        ),
        (
            {"backbone": "vgg16_bn", "model_kwargs": _kwargs(in_channels=1)},
            "backbone='vgg16', in_channels=3",
            "backbone='vgg16_bn', in_channels=1",
            "backbone and input channels",
        ),
    ],
)
def test_init_from_a_run_that_cannot_fit_is_refused_before_set_up(
    trained, tmp_path, overrides, held, wanted, words
):
    data_dir, source = trained
    before = _fingerprint(source)
    config = _config(data_dir, model="fcn16s", init_from=str(source), **overrides)
    with pytest.raises(ValueError) as error:
        loop.train_and_evaluate(config, tmp_path / "new")
    assert str(error.value) == (
        f"--init_from={source} holds a fcn8s with {held}, but this run's fcn16s has {wanted}; "
        f"initialise from a run with the same {words}."
    )
    assert _fingerprint(source) == before
    assert not (tmp_path / "new").exists()


def test_defaults_left_implicit_or_spelled_out_compare_equal(trained):
    """A spec written before in_channels/param_dtype were recorded, or one that leaves the
    backbone to the model's default, is the same architecture as one that spells them out."""
    data_dir, _ = trained
    old = {"model": "fcn8s", "num_classes": 21, "backbone": None, "model_kwargs": {"base_width": 4}}
    explicit = spec_lib.model_spec(
        spec_lib.resolve_config(
            tiny_config(
                data_dir,
                backbone="vgg16",
                model_kwargs=json.dumps(
                    {"base_width": 4, "in_channels": 3, "param_dtype": "float32"}
                ),
            )
        )
    )
    assert explicit["in_channels"] == 3 and explicit["param_dtype"] == "float32"
    assert spec_lib.spec_differences(old, explicit) == {}
    checkpointing.check_compatible(old, explicit, "wd")
    assert build_model(old).in_channels == 3


# What flaxseg wrote into a checkpoint's metadata before ``config.model`` was nested (commit
# cbbf4a6, this module's tiny FCN-8s), as read from a run of that code: the spec's layout is
# still today's; the config had flat model fields and JSON strings.
OLD_MODEL_SPEC = {
    "model": "fcn8s",
    "num_classes": 21,
    "backbone": "vgg16",
    "in_channels": 3,
    "param_dtype": "float32",
    "model_kwargs": {"base_width": 4, "fc_channels": 16},
}
OLD_CONFIG_MODEL_FIELDS = {
    "model": "fcn8s",
    "backbone": "vgg16",
    "model_kwargs": '{"base_width": 4, "fc_channels": 16}',
    "output_stride": 0,
    "adversary_kwargs": "{}",
}


def test_a_checkpoint_written_before_config_model_was_nested_restores(trained, tmp_path, capsys):
    data_dir, workdir = trained
    assert spec_lib.model_spec(spec_lib.resolve_config(_config(data_dir))) == OLD_MODEL_SPEC
    old = tmp_path / "old"
    shutil.copytree(workdir, old)
    meta_file = old / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["config"].update(OLD_CONFIG_MODEL_FIELDS)  # "model" was a dict: now the old string
    meta["model_spec"] = OLD_MODEL_SPEC
    meta_file.write_text(json.dumps(meta))
    # eval.py (and predict.py / export.py, which restore the same way) and a resumed run.
    assert evaluation.evaluate_workdir(old)["miou"] == evaluation.evaluate_workdir(workdir)["miou"]
    summary = loop.train_and_evaluate(_config(data_dir, steps=3), old)
    assert summary["step"] == 3 and "Resumed from" in capsys.readouterr().out


def _drifted_copy(workdir: Path, target: Path) -> Path:
    """The run with its recorded spec saying fc_channels=8 while its arrays have 16: what a
    checkpoint looks like to code whose model changed since it was saved."""
    shutil.copytree(workdir, target)
    meta_file = target / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["model_spec"]["model_kwargs"]["fc_channels"] = 8
    meta_file.write_text(json.dumps(meta))
    return target


def test_arrays_that_do_not_fit_are_refused_from_the_metadata_and_left_in_place(
    trained, tmp_path, monkeypatch
):
    data_dir, workdir = trained
    drifted = _drifted_copy(workdir, tmp_path / "drifted")
    before = _fingerprint(drifted)
    sentence = (
        f"Checkpoint step 2 in {drifted / 'checkpoints'} holds arrays that do not fit the model "
        "restored from it: params/fc6/bias is (16,) float32 there, (8,) float32 here; "
        "params/fc6/kernel is (7, 7, 32, 16) float32 there, (7, 7, 32, 8) float32 here; "
        "params/fc7/bias is (16,) float32 there, (8,) float32 here (and 2 more); it was left "
        "untouched (the model settings or flaxseg's code differ from the run that saved it)."
    )
    with pytest.raises(ValueError) as error:  # eval.py
        evaluation.evaluate_workdir(drifted)
    assert str(error.value) == sentence

    # Resuming with the settings the spec records: refused before any array is read, and not
    # taken for a damaged checkpoint (nothing is moved to checkpoints_damaged/).
    read = []
    monkeypatch.setattr(checkpoints, "restore", lambda *args, **kwargs: read.append(args))
    with pytest.raises(ValueError, match=r"holds arrays that do not fit the model") as error:
        loop.train_and_evaluate(
            _config(data_dir, steps=4, model_kwargs=_kwargs(fc_channels=8)), drifted
        )
    assert str(error.value).startswith(sentence.split(" (and 2 more)")[0])
    assert "(and 7 more)" in str(error.value) and read == []  # the optimiser state too
    assert _fingerprint(drifted) == before
    assert sorted(p.name for p in drifted.iterdir()) == ["checkpoints", "tensorboard"]


def test_another_compute_dtype_resumes_and_says_so(trained, tmp_path, capsys):
    """--config.dtype is how the model computes, not what it stores: a float32 run may go on
    in bfloat16 (and a bfloat16 run be evaluated in float32)."""
    data_dir, workdir = trained
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    summary = loop.train_and_evaluate(_config(data_dir, steps=3, dtype="bfloat16"), copy)
    out = capsys.readouterr().out
    assert summary["step"] == 3
    assert (
        "The checkpoint was trained with --config.dtype=float32; resuming in bfloat16 (the "
        "compute dtype; the parameters stay float32)." in out
    )
    assert "Resumed from" in out
