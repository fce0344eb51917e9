import numpy as np
import pytest
import torch

from workers.engine import ModelSpec, Split, TrainConfig, accuracy, evaluate, gaps, mia_efficacy, train_model
from workers.engine.metrics import (
    MIA_DRAWS,
    auc_percent,
    balanced_member_draw,
    evaluate_with_membership,
    fit_membership_attack,
    logit_confidence,
    membership_attacker,
    membership_auc,
    mia_from_confidences,
    mia_over_draws,
    split_attack,
    split_probs,
    true_class_probs,
    ulira,
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


def test_evaluate_reports_accuracies_and_mia_over_draws(small_model, small_train, digits):
    forget, retain = small_train.subset(range(40)), small_train.subset(range(40, 400))
    metrics = evaluate(small_model, forget, retain, digits.test)
    assert set(metrics) == {"FA", "RA", "TA", "MIA", "MIA_sd"}
    assert metrics["FA"] == pytest.approx(accuracy(small_model, forget))
    assert metrics["TA"] == pytest.approx(accuracy(small_model, digits.test))
    probs = split_probs(small_model, forget, retain, digits.test)
    draws = mia_over_draws(split_attack(probs, retain, digits.test), true_class_probs(probs["FA"], forget.y))
    assert len(draws["values"]) == MIA_DRAWS
    assert (metrics["MIA"], metrics["MIA_sd"]) == (draws["mean"], draws["sd"])
    assert metrics["MIA"] == pytest.approx(np.mean(draws["values"]))


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


def test_logit_confidence_stays_finite_where_the_probability_rounds_to_one():
    logits = torch.tensor([[0.0, 0.0], [30.0, 0.0], [0.0, 2.0], [200.0, 0.0]])
    probs = torch.softmax(logits, dim=1)
    assert probs[1, 0].item() == 1.0  # float32: log(p / (1 - p)) would be infinite
    values = logit_confidence(probs, torch.tensor([0, 0, 0, 0]))
    assert values[:3] == pytest.approx([0.0, 30.0, -2.0], abs=1e-4)
    assert np.isfinite(values[3]) and values[3] > 100


def test_member_draws_are_balanced_per_class_against_the_whole_test_split():
    rng = np.random.default_rng(0)
    retain_labels = np.repeat(np.arange(3), [50, 40, 5])  # class 2 mostly forgotten
    test_labels = np.repeat(np.arange(3), [10, 20, 8])
    first = balanced_member_draw(retain_labels, test_labels, rng)
    second = balanced_member_draw(retain_labels, test_labels, rng)
    for members, non_members in (first, second):
        assert len(set(members)) == len(members)  # without replacement
        assert [int((retain_labels[members] == c).sum()) for c in range(3)] == [10, 20, 5]
        assert [int((test_labels[non_members] == c).sum()) for c in range(3)] == [10, 20, 5]
        assert set(non_members) >= set(np.flatnonzero(test_labels != 2))  # the whole test split where it can
    assert set(first[0]) != set(second[0])  # each draw its own members


@pytest.fixture(scope="module")
def membership_setting(small_model, small_train, digits):
    """The small model's confidences: its 40 first training samples as the forget set, the other 360
    as retain, 100 test samples (about 10 per class, so each draw takes a fraction of the retain
    samples of a class)."""
    forget, retain = small_train.subset(range(40)), small_train.subset(range(40, 400))
    test = digits.test.subset(range(100))
    probs = split_probs(small_model, forget, retain, test)
    conf = {key: true_class_probs(probs[key], split.y) for key, split in (("FA", forget), ("RA", retain), ("TA", test))}
    return conf, retain.y.numpy(), test.y.numpy()


def test_mia_over_draws_is_stable_while_single_draws_differ(membership_setting):
    conf, retain_y, test_y = membership_setting
    runs = [mia_over_draws(fit_membership_attack(conf["RA"], retain_y, conf["TA"], test_y, seed=seed), conf["FA"])
            for seed in range(4)]
    for run in runs:
        assert len(set(run["values"])) > 1 and run["sd"] > 0  # the draws disagree: one draw is not the figure
        assert run["sd"] == pytest.approx(np.std(run["values"], ddof=1))
    means = [run["mean"] for run in runs]
    spread = np.mean([run["sd"] for run in runs])
    # Four independent means of 20 draws each lie within a few standard errors (sd / sqrt(20)) of one another,
    # far tighter than the single draws.
    assert max(means) - min(means) <= 4 * spread / np.sqrt(MIA_DRAWS)
    assert max(means) - min(means) < max(max(run["values"]) - min(run["values"]) for run in runs)


def test_one_draw_gives_no_spread(membership_setting):
    conf, retain_y, test_y = membership_setting
    run = mia_over_draws(fit_membership_attack(conf["RA"], retain_y, conf["TA"], test_y, draws=1), conf["FA"])
    assert run["sd"] == 0.0 and len(run["values"]) == 1
    with pytest.raises(ValueError):
        fit_membership_attack(conf["RA"], retain_y, conf["TA"], test_y, draws=0)


def test_ulira_cannot_tell_matching_populations_apart_and_catches_separated_ones():
    rng = np.random.default_rng(0)
    k_models, n_samples = 4, 500
    difficulty = rng.normal(0.0, 3.0, n_samples)  # per-sample means differ far more than the models do
    retrained = difficulty + rng.normal(0.0, 1.0, (k_models, n_samples))
    same = ulira(retrained, difficulty + rng.normal(0.0, 1.0, (k_models, n_samples)))
    assert 45.0 <= same["AUC"] <= 55.0 and same["TPR@FPR"] < 5.0
    assert (same["models"], same["samples"], same["FPR"]) == (k_models, n_samples, 0.01)
    assert len(same["sample_auc"]) == n_samples
    apart = ulira(retrained, difficulty + 4.0 + rng.normal(0.0, 1.0, (k_models, n_samples)))
    assert apart["AUC"] > 99.0 and apart["TPR@FPR"] > 90.0
    # A shift of one model-to-model sd, small against the samples' spread: a population threshold on the raw
    # confidence barely sees it, the per-example ratio does.
    shifted = difficulty + 1.0 + rng.normal(0.0, 1.0, (k_models, n_samples))
    population = auc_percent(shifted.ravel(), retrained.ravel())
    assert ulira(retrained, shifted)["AUC"] > population + 10.0


def test_ulira_wants_matching_populations_of_at_least_three_models():
    with pytest.raises(ValueError):
        ulira(np.zeros((2, 5)), np.zeros((2, 5)))
    with pytest.raises(ValueError):
        ulira(np.zeros((4, 5)), np.zeros((3, 5)))
