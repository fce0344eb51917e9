import numpy as np
import pytest
import torch

from workers.engine import (
    ModelSpec,
    Split,
    TrainConfig,
    accuracy,
    evaluate,
    gaps,
    mia_efficacy,
    train_model,
)
from workers.engine.metrics import (
    auc_percent,
    evaluate_with_membership,
    membership_attacker,
    membership_auc,
    mia_from_confidences,
)


def test_mia_attack_on_separable_confidences():
    rng = np.random.default_rng(0)
    members = rng.uniform(0.95, 1.0, (200, 1))
    non_members = rng.uniform(0.1, 0.5, (150, 1))
    assert mia_from_confidences(members, non_members, rng.uniform(0.1, 0.5, (40, 1))) == 100.0
    assert mia_from_confidences(members, non_members, rng.uniform(0.95, 1.0, (40, 1))) == 0.0
    with pytest.raises(ValueError):
        mia_from_confidences(members, non_members, np.empty((0, 1)))


def test_a_given_attacker_is_used_instead_of_fitting_one():
    rng = np.random.default_rng(1)
    members, non_members = rng.uniform(0.5, 1.0, (300, 1)), rng.uniform(0.0, 0.7, (300, 1))
    forget = rng.uniform(0.0, 1.0, (100, 1))
    fitted = membership_attacker(members, non_members, seed=3)
    # The same seed's attacker gives the same figure; one fitted on other data gives its own.
    assert mia_from_confidences(members, non_members, forget, seed=3, attacker=fitted) == \
        mia_from_confidences(members, non_members, forget, seed=3)
    inverted = membership_attacker(non_members, members, seed=3)
    with_inverted = mia_from_confidences(members, non_members, forget, seed=3, attacker=inverted)
    assert with_inverted == 100.0 * float((inverted.predict(forget) == 0).mean())
    assert with_inverted != mia_from_confidences(members, non_members, forget, seed=3)


@pytest.fixture(scope="module")
def memorised(digits):
    """A model that memorised 100 samples with shuffled labels: pure membership signal."""
    labels = torch.randint(0, 10, (100,), generator=torch.Generator().manual_seed(0))
    members = Split(digits.train.x[:100], labels)
    model = train_model(ModelSpec().build(), members, TrainConfig(epochs=30), progress=False)
    return model, members


def test_mia_efficacy_separates_unseen_from_memorised_samples(memorised, digits):
    model, members = memorised
    assert accuracy(model, members) >= 95.0
    unseen = digits.train.subset(range(100, 300))
    on_unseen = mia_efficacy(model, members, digits.test, unseen)
    on_members = mia_efficacy(model, members, digits.test, members)
    assert 0.0 <= on_members <= 100.0 and 0.0 <= on_unseen <= 100.0
    assert on_unseen >= 80.0
    assert on_members <= 20.0


def test_evaluate_reports_accuracies_and_mia(small_model, small_train, digits):
    forget, retain = small_train.subset(range(40)), small_train.subset(range(40, 400))
    metrics = evaluate(small_model, forget, retain, digits.test)
    assert set(metrics) == {"FA", "RA", "TA", "MIA"}
    assert metrics["FA"] == pytest.approx(accuracy(small_model, forget))
    assert metrics["TA"] == pytest.approx(accuracy(small_model, digits.test))
    assert metrics["MIA"] == mia_efficacy(small_model, retain, digits.test, forget)


def test_gaps_and_average_gap():
    metrics = {"FA": 90.0, "RA": 99.0, "TA": 95.0, "MIA": 10.0}
    reference = {"FA": 94.0, "RA": 100.0, "TA": 96.0, "MIA": 14.0}
    assert gaps(metrics, reference) == {"FA": 4.0, "RA": 1.0, "TA": 1.0, "MIA": 4.0, "AG": 2.5}


def test_auc_percent_orders_members_above_non_members():
    assert auc_percent(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 100.0
    assert auc_percent(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auc_percent(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 50.0
    with pytest.raises(ValueError):
        auc_percent(np.array([]), np.array([1.0]))


def test_membership_auc_uses_low_loss_as_member_and_calibrates_per_sample():
    forget_loss, test_loss = np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0])
    assert membership_auc(forget_loss, test_loss) == 100.0
    # Calibrated against itself, a model is indistinguishable from its reference.
    assert membership_auc(forget_loss, test_loss, forget_loss, test_loss) == 50.0
    # Easy forget samples that the reference finds just as easy carry no membership signal...
    assert membership_auc(forget_loss, test_loss, forget_loss + 0.05, test_loss + 0.05) == 50.0
    # ...while a loss far below the reference's does.
    assert membership_auc(forget_loss, test_loss, forget_loss + 2.0, test_loss) == 100.0


def test_membership_aucs_separate_memorised_from_unseen_samples(memorised, digits):
    model, members = memorised
    unseen = digits.train.subset(range(100, 300))
    on_members = evaluate_with_membership(model, members, members, digits.test)
    on_unseen = evaluate_with_membership(model, unseen, members, digits.test, reference=model)
    assert on_members["MIA-AUC"] >= 95.0
    assert 30.0 <= on_unseen["MIA-AUC"] <= 70.0
    assert on_unseen["MIA-AUC-cal"] == 50.0
    assert "MIA-AUC-cal" not in on_members
    plain = evaluate(model, unseen, members, digits.test)
    assert {k: on_unseen[k] for k in plain} == plain
