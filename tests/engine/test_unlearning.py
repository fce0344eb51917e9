import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.engine import (
    QMulConfig,
    Split,
    accuracy,
    expected_grad_norm,
    gradient_reweighting,
    predict_probs,
    qmul_unlearn,
    similar_labels,
)
from workers.engine.methods import unlearn
from workers.engine.training import shuffled_batches
from workers.engine.unlearning import qmul_steps, random_other_labels


def test_similar_labels_hand_built_rows():
    probs = torch.tensor([
        [0.70, 0.20, 0.10],  # correct: the runner-up, class 1
        [0.50, 0.30, 0.20],  # misclassified (y=2): class 1 is closest to p_y, not runner-up 0
        [0.05, 0.15, 0.80],  # correct, y=2: runner-up is class 1
        [0.10, 0.60, 0.30],  # misclassified (y=0): class 2 (0.30) is closer than class 1 (0.60)
    ])
    labels = torch.tensor([0, 2, 2, 0])
    assert similar_labels(probs, labels).tolist() == [1, 1, 1, 2]


def test_similar_labels_never_pick_the_true_class():
    probs = torch.softmax(torch.randn(500, 10, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(1))
    chosen = similar_labels(probs, labels)
    assert (chosen != labels).all()
    gap = (probs - probs.gather(1, labels[:, None])).abs()
    gap[torch.arange(500), labels] = float("inf")
    assert torch.equal(gap.gather(1, chosen[:, None]).squeeze(1), gap.min(dim=1).values)


def test_random_other_labels_differ_from_the_true_label_and_are_seeded():
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    drawn = random_other_labels(labels, 10, seed=3)
    assert (drawn != labels).all() and drawn.min() >= 0 and drawn.max() <= 9
    assert torch.equal(drawn, random_other_labels(labels, 10, seed=3))
    assert len(torch.unique(drawn)) == 10


@pytest.mark.parametrize("g_f, g_r", [(3.0, 1.0), (0.02, 25.0), (1.0, 1.0)])
def test_gradient_reweighting_balances_the_weighted_norms(g_f, g_r):
    w_f, w_r = gradient_reweighting(g_f, g_r)
    assert w_f * g_f == pytest.approx(w_r * g_r)
    assert w_f + w_r == pytest.approx(1.0)
    assert gradient_reweighting(3.0, 1.0) == (0.25, 0.75)


def test_gradient_reweighting_zero_guards():
    assert gradient_reweighting(0.0, 0.0) == (0.5, 0.5)
    assert gradient_reweighting(0.0, 2.0) == (1.0, 0.0)  # flat forget loss: all weight to it
    assert gradient_reweighting(2.0, 0.0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        gradient_reweighting(-1.0, 1.0)


def test_expected_grad_norm_is_the_mean_of_mini_batch_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    split = Split(torch.randn(10, 1, 2, 2), torch.randint(0, 3, (10,)))
    batches = shuffled_batches(10, 4, torch.Generator().manual_seed(7))
    norms = []
    for index in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(split.x[index]), split.y[index]),
                                    list(model.parameters()))
        norms.append(torch.sqrt(sum((g**2).sum() for g in grads)).item())
    model.train()
    measured = expected_grad_norm(model, split, split.y, batch_size=4, seed=7)
    assert measured == pytest.approx(sum(norms) / 3, rel=1e-5)
    assert model.training and all(p.grad is None for p in model.parameters())
    capped = expected_grad_norm(model, split, split.y, batch_size=4, max_batches=1, seed=7)
    assert capped == pytest.approx(norms[0], rel=1e-5)


def test_qmul_forgets_a_class_and_keeps_the_rest(small_model, small_train):
    """Class-wise forgetting on a 400-sample model: the forgotten class must fall far below the
    original's accuracy on it while the other classes stay close to where they were. (Forgetting
    random samples of a model that generalises should barely move FA: the retrain reference still
    classifies them.)"""
    is_zero = small_train.y == 0
    forget = small_train.subset(torch.where(is_zero)[0])
    retain = small_train.subset(torch.where(~is_zero)[0])
    before = {p: t.clone() for p, t in small_model.state_dict().items()}
    fa_before, ra_before = accuracy(small_model, forget), accuracy(small_model, retain)

    result = qmul_unlearn(small_model, forget, retain, QMulConfig(epochs=3), progress=False)

    assert fa_before >= 90.0
    assert accuracy(result.model, forget) <= fa_before - 50.0
    assert accuracy(result.model, retain) >= ra_before - 10.0
    assert all(torch.equal(before[p], t) for p, t in small_model.state_dict().items())
    assert [entry["epoch"] for entry in result.history] == [0, 1, 2]
    for entry in result.history:
        assert entry["w_f"] * entry["G_f"] == pytest.approx(entry["w_r"] * entry["G_r"])
        assert entry["G_f"] > 0 and entry["G_r"] > 0
        assert {"forget_loss", "retain_loss", "loss"} <= entry.keys()


def test_compiled_qmul_forgets_as_the_eager_run_does_and_returns_the_plain_model(small_model, small_train):
    # torch.compile (epoch_floor --compile): the fused kernels round differently, so not the same
    # numbers, but the same forgetting; and the result is the model itself, whose state dict an
    # artifact stores, not the compiled wrapper ("_orig_mod.*" keys).
    is_zero = small_train.y == 0
    forget = small_train.subset(torch.where(is_zero)[0])
    retain = small_train.subset(torch.where(~is_zero)[0])
    config = QMulConfig(epochs=2, grad_norm_batches=2)
    eager = qmul_unlearn(small_model, forget, retain, config, progress=False)
    compiled = qmul_unlearn(small_model, forget, retain, config, progress=False, compile_model=True)

    assert type(compiled.model) is type(small_model)
    assert compiled.model.state_dict().keys() == small_model.state_dict().keys()
    assert accuracy(compiled.model, forget) == pytest.approx(accuracy(eager.model, forget), abs=15)
    assert accuracy(compiled.model, retain) == pytest.approx(accuracy(eager.model, retain), abs=5)
    for eager_epoch, compiled_epoch in zip(eager.history, compiled.history, strict=True):
        assert compiled_epoch["loss"] == pytest.approx(eager_epoch["loss"], rel=0.1)


def test_qmul_pulls_random_forget_samples_towards_their_similar_labels(small_model, small_train):
    """Random forgetting: fine-tuning on the retain set alone makes the model surer of the true
    classes, so the cross-entropy of the forget samples against their similar labels rises; only
    Q-MUL's forget loss holds it back. Measured (5 epochs): original 2.86, Q-MUL 3.57, FT 4.29.

    Changed deliberately with the default schedule: the first version paired every retain batch
    with the (cycled) forget set, 30 forget steps on these 40 samples in 5 epochs, and 27.5% of
    them reached their similar label; one pass over the forget set per epoch takes 5 steps and
    moves samples that the retrain reference still classifies much less, as it should (see the
    module docstring for the measurements behind the change)."""
    order = torch.randperm(len(small_train), generator=torch.Generator().manual_seed(0))
    forget, retain = small_train.subset(order[:40]), small_train.subset(order[40:])
    targets = similar_labels(predict_probs(small_model, forget.x), forget.y)

    def similar_label_loss(model):
        probs = predict_probs(model, forget.x)
        return F.nll_loss(probs.clamp_min(1e-12).log(), targets).item()

    qmul = qmul_unlearn(small_model, forget, retain, QMulConfig(epochs=5), progress=False).model
    fine_tuned = unlearn("ft", small_model, forget, retain, {"epochs": 5}, progress=False).model
    assert similar_label_loss(qmul) < similar_label_loss(fine_tuned) - 0.3
    assert accuracy(qmul, retain) >= 90.0


def test_qmul_ablations_switch_their_component_off(small_model, small_train):
    forget, retain = small_train.subset(range(20)), small_train.subset(range(20, 120))
    config = QMulConfig(epochs=1, gradient_reweighting=False, similar_labels=False)
    result = qmul_unlearn(small_model, forget, retain, config, progress=False)
    assert (result.history[0]["w_f"], result.history[0]["w_r"]) == (1.0, 1.0)
    with pytest.raises(ValueError):
        qmul_unlearn(small_model, forget.subset([]), retain, config, progress=False)


def occurrences(steps, position):
    index = [step[position] for step in steps if step[position] is not None]
    return torch.cat(index).bincount() if index else torch.zeros(0, dtype=torch.long)


@pytest.mark.parametrize("schedule", ["interleaved", "proportional", "sequential"])
@pytest.mark.parametrize("n_forget, n_retain", [(20, 1400), (144, 1293), (300, 100)])
def test_one_pass_schedules_see_every_sample_once_per_epoch(schedule, n_forget, n_retain):
    steps = qmul_steps(schedule, n_forget, n_retain, 64, torch.Generator().manual_seed(0))
    assert torch.equal(occurrences(steps, 0), torch.ones(n_forget, dtype=torch.long))
    assert torch.equal(occurrences(steps, 1), torch.ones(n_retain, dtype=torch.long))
    if schedule == "interleaved":  # the smaller set's batches are spread over the larger's
        assert len(steps) == max(-(-n_forget // 64), -(-n_retain // 64))
        forget_steps = [i for i, (f, _) in enumerate(steps) if f is not None]
        if len(forget_steps) > 1:
            spacing = torch.diff(torch.tensor(forget_steps))
            assert spacing.max() - spacing.min() <= 1
    if schedule == "sequential":  # RL's order: the forget pass first
        assert all(f is not None for f, _ in steps[: -(-n_forget // 64)])


def test_cycled_schedule_repeats_a_small_forget_set():
    steps = qmul_steps("cycled", 20, 1400, 64, torch.Generator().manual_seed(0))
    assert len(steps) == 22 and all(f is not None and r is not None for f, r in steps)
    assert torch.equal(occurrences(steps, 0), torch.full((20,), 22))
    with pytest.raises(ValueError, match="unknown schedule"):
        qmul_steps("nope", 20, 1400, 64, torch.Generator())
