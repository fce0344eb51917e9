import copy
import hashlib

import pytest
import torch

from workers.engine import load_artifact, predict_probs, save_artifact
from workers.engine.quantization import LsqPlusQuantizer


@pytest.fixture
def spec(small_spec):
    return {"model": small_spec.model_kwargs(), "dataset": "digits", "note": [1, 2.5, None]}


def test_round_trip_gives_the_same_model(small_model, spec, digits, tmp_path):
    path, sha256 = save_artifact(small_model, spec, tmp_path)
    assert path == tmp_path / f"{sha256}.pt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind

    loaded, loaded_spec = load_artifact(path, expected_sha256=sha256)
    assert loaded_spec == spec
    assert torch.equal(predict_probs(loaded, digits.test.x), predict_probs(small_model, digits.test.x))
    quantizers = [m for m in loaded.modules() if isinstance(m, LsqPlusQuantizer)]
    assert quantizers and all(q.initialized for q in quantizers)


def test_saving_is_content_addressed(small_model, spec, tmp_path):
    first = save_artifact(small_model, spec, tmp_path)
    assert save_artifact(small_model, spec, tmp_path) == first
    other = save_artifact(small_model, {**spec, "dataset": "other"}, tmp_path)
    assert other[1] != first[1]


def test_artifacts_do_not_depend_on_the_memory_layout_the_model_ran_in(small_model, spec, tmp_path):
    # The engine runs convolutions channels-last (build_model); the artifact holds the standard layout.
    convolution_weights = [p for p in small_model.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convolution_weights)
    assert any(not p.is_contiguous() for p in convolution_weights)  # (with one input channel, both hold)
    standard = copy.deepcopy(small_model).to(memory_format=torch.contiguous_format)
    assert save_artifact(standard, spec, tmp_path) == save_artifact(small_model, spec, tmp_path)

    loaded, _ = load_artifact(save_artifact(small_model, spec, tmp_path)[0])
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in loaded.parameters() if p.dim() == 4)


def test_tampered_or_unexpected_artifacts_are_rejected(small_model, spec, tmp_path):
    path, sha256 = save_artifact(small_model, spec, tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        load_artifact(path, expected_sha256="0" * 64)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_artifact(path)  # checked against the file name
    with pytest.raises(ValueError, match="sha256"):
        load_artifact(path, expected_sha256=sha256)


def test_spec_must_say_how_to_rebuild_the_model(small_model, tmp_path):
    with pytest.raises(ValueError, match="model"):
        save_artifact(small_model, {"dataset": "digits"}, tmp_path)


def test_a_post_training_layout_travels_in_the_spec(tmp_path):
    from workers.engine.models import build_model
    from workers.engine.ptq import apply_layout, calibrate, ptq_layout, two_region_targets

    kwargs = {"architecture": "digits-vit", "num_classes": 10, "in_channels": 1, "weight_bits": 4, "act_bits": 4}
    torch.manual_seed(0)
    model = build_model(**kwargs)
    apply_layout(model, {"two_region": two_region_targets(model)[:2], "weight_bits": {"blocks.0.mlp.0": 6}})
    calibrate(model, [torch.randn(8, 1, 8, 8)])
    path, _ = save_artifact(model, {"model": kwargs}, tmp_path)
    loaded, spec = load_artifact(path)
    assert spec["ptq_layout"] == ptq_layout(model) == {"two_region": sorted(two_region_targets(model)[:2]),
                                                        "weight_bits": {"blocks.0.mlp.0": 6}}
    assert loaded.blocks[0].mlp[0].weight_quantizer.bits == 6
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ptq_layout|layout"):
        apply_layout(build_model(**kwargs), {"unknown": 1})
