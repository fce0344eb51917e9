import copy

import pytest
import torch
import torch.nn.functional as F

from workers.engine import QMulConfig, Split, TrainConfig, build_model, qmul_unlearn, train_model
from workers.engine.coresets import (
    js_divergence,
    penultimate_features,
    relative_entropy_scores,
    select_coreset,
    top_per_class,
)
from workers.engine.quantization import QuantLinear, quantization_off
from workers.engine.training import LayerCorrection, predict_logits


def test_quantization_off_gives_the_float_layers_output_and_restores_quantization(small_model, small_train):
    x = small_train.x[:32]
    quantized = predict_logits(small_model, x)
    float_twin = build_model("digits-cnn", 10, 1, weight_bits=None, act_bits=None, first_last_bits=None)
    # The same latent weights and BatchNorm statistics in a model without quantizers.
    float_twin.load_state_dict({k: v for k, v in small_model.state_dict().items()
                                if "quantizer" not in k})
    with quantization_off(small_model):
        off = predict_logits(small_model, x)
    assert torch.allclose(off, predict_logits(float_twin, x), atol=1e-5)
    assert not torch.allclose(off, quantized, atol=1e-3)
    assert torch.equal(predict_logits(small_model, x), quantized)  # quantization is back on
    assert all(m.quantize for m in small_model.modules() if isinstance(m, QuantLinear))


def test_top_per_class_keeps_each_class_share_and_the_highest_scores():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 1)
    scores = torch.arange(31, dtype=torch.float)
    chosen = top_per_class(scores, labels, 0.3)
    assert chosen.tolist() == [7, 8, 9] + list(range(24, 30)) + [30]  # 3 of 10, 6 of 20, at least 1


@pytest.mark.parametrize("selector", ["random", "res", "jscds"])
def test_select_coreset_is_seeded_stratified_and_valid(selector, small_model, small_train):
    chosen = select_coreset(small_model, small_train, 0.2, selector, seed=1)
    assert chosen.dtype == torch.long and len(chosen.unique()) == len(chosen)
    assert abs(len(chosen) - 0.2 * len(small_train)) <= 10  # rounding per class
    for c in small_train.y.unique():
        share = (small_train.y[chosen] == c).sum().item()
        assert share == max(1, round(0.2 * (small_train.y == c).sum().item()))
    assert torch.equal(chosen, select_coreset(small_model, small_train, 0.2, selector, seed=1))


def test_random_selection_changes_with_the_seed(small_model, small_train):
    assert not torch.equal(select_coreset(None, small_train, 0.2, "random", seed=1),
                           select_coreset(None, small_train, 0.2, "random", seed=2))


def test_select_coreset_rejects_unknown_selector_and_bad_fraction(small_train):
    with pytest.raises(ValueError, match="selector"):
        select_coreset(None, small_train, 0.2, "entropy")
    with pytest.raises(ValueError, match="fraction"):
        select_coreset(None, small_train, 0.0, "random")


def test_relative_entropy_scores_are_the_kl_from_the_float_view(small_model, small_train):
    x = small_train.x[:64]
    scores = relative_entropy_scores(small_model, x)
    log_q = F.log_softmax(predict_logits(small_model, x), dim=1)
    with quantization_off(small_model):
        log_p = F.log_softmax(predict_logits(small_model, x), dim=1)
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(dim=1)
    assert torch.allclose(scores, expected, atol=1e-6)
    assert (scores >= -1e-6).all() and scores.max() > 0
    # Against itself as the float model the divergence is zero.
    assert relative_entropy_scores(small_model, x, float_model=small_model).abs().max() < 1e-6


def test_res_keeps_the_samples_with_the_largest_divergence(small_model, small_train):
    scores = relative_entropy_scores(small_model, small_train.x)
    chosen = select_coreset(small_model, small_train, 0.1, "res")
    for c in small_train.y.unique():
        members = torch.where(small_train.y == c)[0]
        kept = chosen[small_train.y[chosen] == c]
        dropped = members[~torch.isin(members, kept)]
        assert scores[kept].min() >= scores[dropped].max()


def test_js_divergence_known_values():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    assert torch.allclose(js_divergence(p, q), torch.tensor([torch.log(torch.tensor(2.0)), 0.0]), atol=1e-6)


def test_penultimate_features_are_the_last_linear_input(small_model, small_train):
    x = small_train.x[:8]
    features = penultimate_features(small_model, x)
    last = small_model.classifier[-1]
    with torch.no_grad():
        small_model.eval()
        assert torch.allclose(last(features), predict_logits(small_model, x), atol=1e-5)
    assert features.shape == (8, last.in_features)


def test_jscds_keeps_the_samples_nearest_the_class_mean_divergence(small_model, small_train):
    features = penultimate_features(small_model, small_train.x)
    chosen = select_coreset(small_model, small_train, 0.2, "jscds")
    c = int(small_train.y[0])
    members = torch.where(small_train.y == c)[0]
    p = F.softmax(features[members], dim=1)
    js = js_divergence(p, F.softmax(features[members].mean(0, keepdim=True), dim=1).expand_as(p))
    distance = (js - js.mean()).abs()
    kept = torch.isin(members, chosen)
    assert distance[kept].max() <= distance[~kept].min()


def test_qmul_retain_coreset_trains_on_the_coreset_only(small_model, small_train):
    forget, retain = small_train.subset(range(40)), small_train.subset(range(40, 400))
    config = QMulConfig(epochs=1, retain_coreset=0.2, coreset_selector="res", grad_norm_batches=2)
    result = qmul_unlearn(small_model, forget, retain, config, progress=False)
    assert result.history[0]["retain_samples"] == len(select_coreset(small_model, retain, 0.2, "res"))
    full = qmul_unlearn(small_model, forget, retain, QMulConfig(epochs=1, grad_norm_batches=2), progress=False)
    assert full.history[0]["retain_samples"] == 360
    assert result.history[0]["steps"] < full.history[0]["steps"]
    with pytest.raises(ValueError, match="selector"):
        qmul_unlearn(small_model, forget, retain, QMulConfig(retain_coreset=0.2, coreset_selector="x"))


def test_layer_correction_is_zero_against_itself_and_pulls_the_student_to_the_teacher(small_model, small_train):
    x = small_train.x[:64]
    student = copy.deepcopy(small_model)
    correction = LayerCorrection(student, copy.deepcopy(small_model))
    student.eval()  # the teacher runs in eval mode
    student(x)
    assert correction.loss(x).item() < 1e-10
    correction.remove()

    # A fresh quantized student trained on a few samples with the float model as the teacher ends
    # closer to it, layer by layer, than one trained without.
    teacher = build_model("digits-cnn", 10, 1, weight_bits=None, act_bits=None, first_last_bits=None)
    train_model(teacher, small_train, TrainConfig(epochs=4), progress=False)
    few = Split(small_train.x[:100], small_train.y[:100])
    config = TrainConfig(epochs=3, seed=0)
    plain = train_model(build_model("digits-cnn", 10, 1, 4, 4), few, config, progress=False)
    corrected = train_model(build_model("digits-cnn", 10, 1, 4, 4), few, config, progress=False, teacher=teacher, clc_weight=1.0)
    assert not any(h for m in corrected.modules() for h in m._forward_hooks.values())  # hooks removed

    def distance(student):
        probe = LayerCorrection(student, teacher.eval())
        student.eval()
        with torch.no_grad():
            student(small_train.x)
            value = probe.loss(small_train.x).item()
        probe.remove()
        return value

    assert distance(corrected) < distance(plain)
