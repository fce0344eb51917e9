"""Q-MUL's options for the authors' public code: each changes what it should, and the preset
(QMulPublicConfig, method "qmul-public") sets them all."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.engine import (
    QMulConfig,
    QMulPublicConfig,
    Split,
    expected_grad_norm,
    qmul_unlearn,
    similar_labels,
    unlearning,
)
from workers.engine.methods import method_config, unlearn
from workers.engine.training import shuffled_batches
from workers.engine.unlearning import qmul_steps


@pytest.fixture(scope="module")
def small_sets(small_train):
    """40 forget and 160 retain samples of the digits, without augmentation (repeatable losses)."""
    order = torch.randperm(len(small_train), generator=torch.Generator().manual_seed(0))
    plain = Split(small_train.x, small_train.y)
    return plain.subset(order[:40]), plain.subset(order[40:200])


def test_unmapped_index_is_one_lower_for_classes_above_the_true_one():
    probs = torch.tensor([
        [0.10, 0.50, 0.05, 0.35],  # y=1: closest j=3 (above y): the code's index says 2
        [0.35, 0.50, 0.05, 0.10],  # y=1: closest j=0 (below y): both say 0
        [0.05, 0.50, 0.40, 0.05],  # y=1: closest j=2 = y+1: the code's index is y itself
    ])
    labels = torch.tensor([1, 1, 1])
    assert similar_labels(probs, labels).tolist() == [3, 0, 2]
    assert similar_labels(probs, labels, map_index=False).tolist() == [2, 0, 1]


def test_logit_distance_compares_raw_logits_with_the_true_class_probability():
    logits = torch.tensor([[0.0, -1.0, 1.0]])
    probs = F.softmax(logits, dim=1)  # p = 0.245, 0.090, 0.665
    labels = torch.tensor([0])
    assert similar_labels(probs, labels).item() == 1  # |0.090 - 0.245| < |0.665 - 0.245|
    assert similar_labels(probs, labels, logits).item() == 2  # |1 - 0.245| < |-1 - 0.245|


def test_tensor_sum_norm_is_the_hand_computation_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    split = Split(torch.randn(10, 1, 2, 2), torch.randint(0, 3, (10,)))
    hand = copy.deepcopy(model).train()
    sums, globals_ = [], []
    for index in shuffled_batches(10, 4, torch.Generator().manual_seed(7)):
        grads = torch.autograd.grad(F.cross_entropy(hand(split.x[index]), split.y[index]),
                                    list(hand.parameters()))
        sums.append(sum(g.norm().item() for g in grads))
        globals_.append(torch.sqrt(sum((g**2).sum() for g in grads)).item())
    model.eval()
    measured = expected_grad_norm(model, split, split.y, batch_size=4, seed=7, norm="tensor-sum")
    assert measured == pytest.approx(sum(sums) / len(sums), rel=1e-5)
    assert measured > sum(globals_) / len(globals_) * 1.2  # not the global norm
    assert not model.training  # mode restored, but BatchNorm's running statistics moved
    assert torch.allclose(model[2].running_mean, hand[2].running_mean)
    assert model[2].num_batches_tracked.item() == 3
    with pytest.raises(ValueError, match="unknown grad norm"):
        expected_grad_norm(model, split, split.y, norm="l1")


def test_labels_are_chosen_again_every_epoch_in_train_mode(small_model, small_sets, monkeypatch):
    forget, retain = small_sets
    calls = []
    original = unlearning.forget_similar_labels

    def recording(model, forget, config, device, train_mode):
        calls.append(train_mode)
        return original(model, forget, config, device, train_mode)

    monkeypatch.setattr(unlearning, "forget_similar_labels", recording)
    once = qmul_unlearn(small_model, forget, retain, QMulConfig(epochs=3), progress=False)
    assert calls == [False] and "labels_changed" not in once.history[0]
    calls.clear()
    config = QMulConfig(epochs=3, relabel_every_epoch=True, lr=0.05)
    every = qmul_unlearn(small_model, forget, retain, config, progress=False)
    assert calls == [False, True, True, True]  # once before, then at every epoch's start
    assert [entry["labels_changed"] >= 0 for entry in every.history] == [True] * 3
    assert sum(entry["labels_changed"] for entry in every.history[1:]) > 0  # the model moved


def test_cosine_lr_anneals_towards_zero_and_constant_stays(small_model, small_sets):
    forget, retain = small_sets
    epochs, lr = 6, 0.01
    cosine = qmul_unlearn(small_model, forget, retain,
                          QMulConfig(epochs=epochs, lr=lr, lr_schedule="cosine"), progress=False)
    lrs = [entry["lr"] for entry in cosine.history]
    expected = [lr * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] == lr and lrs[-1] < 0.07 * lr  # the last epoch runs at 7% of lr; after it, 0
    constant = qmul_unlearn(small_model, forget, retain, QMulConfig(epochs=2, lr=lr),
                            progress=False)
    assert [entry["lr"] for entry in constant.history] == [lr, lr]


def test_union_steps_cover_each_sample_once():
    steps = qmul_steps("union", 10, 23, 8, torch.Generator().manual_seed(0))
    forget = torch.cat([f for f, _ in steps if f is not None])
    retain = torch.cat([r for _, r in steps if r is not None])
    assert sorted(forget.tolist()) == list(range(10)) and sorted(retain.tolist()) == list(range(23))
    assert len(steps) == 5
    assert [len(f if f is not None else []) + len(r if r is not None else []) for f, r in steps] == [
        8, 8, 8, 8, 1]


def test_union_loss_is_the_per_sample_weighted_sum_over_the_batch(small_model, small_sets):
    """With lr 0 the model stays put, so each step's loss can be recomputed by hand:
    sum(w_i * ce_i) / batch size, w_i = w_f on forget samples and w_r on retain samples."""
    forget, retain = small_sets
    config = QMulConfig(epochs=1, lr=0.0, batch_size=32, schedule="union")
    result = qmul_unlearn(small_model, forget, retain, config, progress=False)
    entry = result.history[0]
    targets = unlearning.forget_similar_labels(small_model, forget, config, "cpu", train_mode=False)
    model = copy.deepcopy(small_model).train()
    losses = []
    with torch.no_grad():
        for f, r in qmul_steps("union", len(forget), len(retain), 32,
                               torch.Generator().manual_seed(config.seed)):
            f = f if f is not None else torch.empty(0, dtype=torch.long)
            r = r if r is not None else torch.empty(0, dtype=torch.long)
            logits = model(torch.cat([forget.x[f], retain.x[r]]))
            ce = F.cross_entropy(logits, torch.cat([targets[f], retain.y[r]]), reduction="none")
            weights = torch.cat([torch.full((len(f),), entry["w_f"]),
                                 torch.full((len(r),), entry["w_r"])])
            losses.append(((weights * ce).sum() / len(ce)).item())
    assert entry["steps"] == len(losses) == 7
    assert entry["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_public_code_preset_sets_every_option_and_the_code_optimiser(small_model, small_sets):
    preset = method_config("qmul-public")
    assert isinstance(preset, QMulPublicConfig) and isinstance(preset, QMulConfig)
    assert (preset.relabel_every_epoch, preset.label_distance, preset.label_index,
            preset.grad_norm, preset.lr_schedule) == (True, "logit", "unmapped", "tensor-sum",
                                                      "cosine")
    assert (preset.lr, preset.momentum, preset.weight_decay, preset.batch_size, preset.epochs) == (
        0.01, 0.9, 5e-4, 256, 10)
    assert (preset.schedule, preset.grad_norm_batches) == ("sequential", None)
    default = QMulConfig()
    assert (default.relabel_every_epoch, default.label_distance, default.label_index,
            default.grad_norm, default.lr_schedule, default.schedule) == (
        False, "probability", "mapped", "global", "constant", "sequential")
    forget, retain = small_sets
    result = unlearn("qmul-public", small_model, forget, retain, {"epochs": 2}, progress=False)
    assert [entry["lr"] for entry in result.history] == pytest.approx([0.01, 0.005])
    assert all("labels_changed" in entry for entry in result.history)
    with pytest.raises(ValueError, match="unknown Q-MUL option"):
        qmul_unlearn(small_model, forget, retain, QMulConfig(label_index="other"), progress=False)
