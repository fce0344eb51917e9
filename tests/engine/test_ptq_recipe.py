"""ModelSpec.ptq: a model trained in full precision and quantized after training, by the same
recipe for the original and the retrain reference; a synthetic calibration reads no sample."""

from dataclasses import replace

import pytest
import torch

from workers.engine import ModelSpec, PTQRecipe, Split, TrainConfig, quantize_trained, retrain_reference
from workers.engine.quantization import LsqPlusQuantizer

SPEC = ModelSpec(train=TrainConfig(epochs=2), ptq={"method": "percentile", "samples": 32})


def test_the_recipe_is_checked_and_stored_whole():
    assert SPEC.ptq == {**vars(PTQRecipe()), "samples": 32}
    assert "ptq" not in ModelSpec().to_dict()  # the dicts made before it are unchanged
    assert ModelSpec.from_dict(SPEC.to_dict()) == SPEC
    for bad, field in [({"method": "gptq"}, "ptq.method"), ({"calibration": "public"}, "ptq.calibration"),
                       ({"synthesizer": "gan"}, "ptq.synthesizer"), ({"samples": 0}, "ptq.samples")]:
        with pytest.raises(ValueError, match=field):
            ModelSpec(ptq=bad)
    with pytest.raises(ValueError, match="semi-parametric"):
        ModelSpec(ptq={}, spm={"embed_dim": 16})
    twin = SPEC.full_precision()
    assert (twin.weight_bits, twin.act_bits, twin.first_last_bits, twin.ptq) == (None, None, None, None)
    assert not any(isinstance(m, LsqPlusQuantizer) for m in twin.build().modules())


def test_a_synthetic_calibration_reads_no_sample(one_torch_thread):
    """Images on the meta device have a shape and no values: any read of a sample fails."""
    float_model = SPEC.full_precision().build()
    unreadable = Split(torch.empty(100, 1, 8, 8, device="meta"), torch.zeros(100, dtype=torch.long))
    synthetic = replace(SPEC, ptq={**SPEC.ptq, "calibration": "synthetic", "synthesizer": "noise"})
    quantized = quantize_trained(synthetic, float_model, unreadable, progress=False)
    assert isinstance(quantized, torch.nn.Module) and quantized(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises((NotImplementedError, RuntimeError)):
        quantize_trained(SPEC, float_model, unreadable, progress=False)


def test_the_reference_is_trained_in_full_precision_then_quantized(one_torch_thread):
    data = SPEC.load_data()
    reference = retrain_reference(SPEC, data.train, progress=False)
    # Post-training grids span the trained weights exactly (max |w| / q_max); QAT would have learnt them.
    layers = [m for m in reference.modules() if isinstance(getattr(m, "weight_quantizer", None), LsqPlusQuantizer)]
    assert layers
    for layer in layers:
        quantizer = layer.weight_quantizer
        expected = layer.weight.detach().abs().max() / quantizer.q_max
        assert torch.allclose(quantizer.scale.max(), expected, rtol=1e-5)
    correct = (reference(data.test.x).argmax(dim=1) == data.test.y).float().mean().item()
    assert correct > 0.5  # 2 epochs on the digits, quantized at 4 bits: far above chance (0.1)
