"""The recipes `qforget bootstrap --architecture` trains a model with."""

import pytest

from workers.bootstrap import BOOTSTRAP_RECIPES, default_spec
from workers.engine import MODELS


def test_each_bootstrap_architecture_has_its_recipe():
    assert default_spec() == default_spec(architecture="digits-cnn")
    cnn = default_spec(epochs=5)
    assert (cnn.architecture, cnn.train.optimizer, cnn.train.epochs) == ("digits-cnn", "sgd", 5)
    vit = default_spec(architecture="digits-vit")
    assert (vit.architecture, vit.dataset, vit.train.optimizer) == ("digits-vit", "digits", "adamw")
    assert default_spec(3, "digits-vit").train.epochs == 3 and vit.train.epochs == 40
    assert set(BOOTSTRAP_RECIPES) <= set(MODELS)
    with pytest.raises(ValueError, match="cannot bootstrap 'vit-tiny'"):
        default_spec(architecture="vit-tiny")


def test_a_semi_parametric_bootstrap_makes_an_spm_around_the_architecture():
    spm = default_spec(3, "digits-cnn", semi_parametric=True)
    assert spm.spm is not None and spm.spm["embed_dim"] > 0 and spm.architecture == "digits-cnn"
    assert default_spec().spm is None
    assert hasattr(spm.build(), "remove_samples")


@pytest.mark.parametrize("arguments, message", [
    (["--ptq", "gptq"], "ptq.method must be one of"),
    (["--ptq", "minmax", "--calibration-samples", "0"], "ptq.samples"),
    (["--synthesizer", "zeroq"], "go with --ptq"),
    (["--architecture", "vit-tiny"], "cannot bootstrap 'vit-tiny'"),
])
def test_bad_bootstrap_options_are_refused_by_name_before_anything_is_made(arguments, message, tmp_path,
                                                                          monkeypatch):
    from service.cli import main

    monkeypatch.setenv("QFORGET_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match=message):
        main(["bootstrap", *arguments])
    assert not any(tmp_path.iterdir())  # no database, no artifact


def test_a_post_training_quantization_recipe_trains_in_full_precision():
    spec = default_spec(3, "digits-vit", ptq={"method": "tsptq"})
    assert spec.ptq["method"] == "tsptq" and spec.weight_bits == 4
    assert spec.full_precision().weight_bits is None
