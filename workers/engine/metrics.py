"""Unlearning metrics: FA, RA, TA, MIA-efficacy and the gaps to the retrain reference, plus two
threshold-free membership tests.

MIA-efficacy follows SalUn / l1-sparse: a membership-inference attacker (an RBF SVM on the softmax
probability of the true class) is fitted on retain samples (members) versus test samples
(non-members); the score is the share of forget samples it calls non-members, in percent. Higher
means more forgotten; the target is the retrain reference's value, not 100.

One attacker is one draw of its member subset, and on small splits that draw alone moves the score
by several points (5.7 to 9.0 points sd over 100 draws on the cpu-cifar10 preset): more than the
differences between methods. So MIA is the mean over MIA_DRAWS attackers, each fitted on its own
class-balanced member draw against the whole test split (mia_over_draws), reported with the sd
between draws (MIA_sd). mia_from_confidences / mia_efficacy keep the single draw for callers that
want the original procedure.

That number hangs on one classifier's one threshold: a forget sample only counts if it crosses
it, so a model whose forget confidences moved halfway scores the same as one that did not move.
The membership AUCs look at the whole distributions instead:

- MIA-AUC: the ROC AUC, in percent, of a loss attack (score = -CE, lower loss = "member") that
  separates forget samples (positives) from test samples (negatives). 50 = the forget samples
  look like unseen data; 100 = every forget sample has a lower loss than every test sample. For
  random forgetting the retrain reference sits near 50; for class-wise forgetting it does not
  (a forgotten class is hard for the reference too), so compare with the reference's value.
- MIA-AUC-cal: the same AUC on a per-sample difficulty-calibrated score,
  loss_reference(x) - loss_model(x) (Watson et al. 2022; offline LiRA with one OUT model). The
  retrain reference is the calibration model: it never saw the forget or the test samples, so
  what remains is how much more the model "knows" x than a model that never saw it. The
  reference itself scores exactly 50; an attacker rarely has such a model, so this is a strong,
  attacker-favouring test. Neither AUC enters AG (the paper's average of four gaps).
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.svm import SVC
from torch import nn

from .data import Split
from .training import predict_probs

METRIC_KEYS = ("FA", "RA", "TA", "MIA")

# Attackers MIA is averaged over. The mean of 20 draws has a standard error of sd / sqrt(20), about
# 1.3 to 2 points where one draw's sd is 5.7 to 9 (measured on cpu-cifar10).
MIA_DRAWS = 20


def true_class_probs(probs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return probs.gather(1, labels[:, None]).numpy()  # N x 1: the attacker's one feature


def mia_from_confidences(
    retain_conf: np.ndarray, test_conf: np.ndarray, forget_conf: np.ndarray, seed: int = 0,
    attacker: SVC | None = None,
) -> float:
    """Fit the attacker on n retain (label 1) and n test (label 0) confidences, n = min of sizes,
    each drawn with a seeded permutation (or take `attacker`, fitted so already); return 100 *
    share of forget samples predicted 0."""
    if len(forget_conf) == 0:
        raise ValueError("MIA-efficacy of an empty forget set is undefined")
    if attacker is None:
        attacker = membership_attacker(retain_conf, test_conf, seed)
    return 100.0 * float((attacker.predict(forget_conf) == 0).mean())


def membership_attacker(retain_conf: np.ndarray, test_conf: np.ndarray, seed: int = 0) -> SVC:
    """One single-draw MIA-efficacy attacker, fitted; its predict() gives 1 for "member", 0 for
    "non-member". The reported MIA averages many of these (fit_membership_attack)."""
    rng = np.random.default_rng(seed)
    n = min(len(retain_conf), len(test_conf))
    members = retain_conf[rng.permutation(len(retain_conf))[:n]]
    non_members = test_conf[rng.permutation(len(test_conf))[:n]]
    attacker = SVC(C=3, gamma="auto", kernel="rbf")
    attacker.fit(np.concatenate([members, non_members]), np.r_[np.ones(n), np.zeros(n)])
    return attacker


def logit_confidence(probs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """log(p_y / (1 - p_y)) per sample: the true-class confidence on the scale where LiRA and U-LiRA
    fit Gaussians (a probability piles up against 1, its logit does not). Computed as
    log p_y - log(sum of the other classes' p), in float64: 1 - p_y would be 0 for a float32 p_y that
    rounds to 1, while the other classes' probabilities stay representable down to about 1e-45, so
    the value stays finite (at most about 103)."""
    p = probs.double()
    true = p.gather(1, labels[:, None]).squeeze(1)
    others = p.scatter(1, labels[:, None], 0.0).sum(dim=1)
    return (torch.log(true.clamp_min(1e-45)) - torch.log(others.clamp_min(1e-45))).numpy()


def balanced_member_draw(retain_labels: np.ndarray, test_labels: np.ndarray,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(retain indices, test indices) for one attacker: per class, as many retain samples drawn
    without replacement as the test split has of that class, against all of those test samples.
    Balanced per class so that the attacker learns membership, not the class mix of either side;
    a class with fewer retain than test samples (a class mostly forgotten) takes all its retain
    samples against as many of its test samples, drawn."""
    members, non_members = [], []
    for label in np.unique(test_labels):
        retain_of = np.flatnonzero(retain_labels == label)
        test_of = np.flatnonzero(test_labels == label)
        n = min(len(retain_of), len(test_of))
        members.append(rng.choice(retain_of, n, replace=False))
        non_members.append(test_of if n == len(test_of) else rng.choice(test_of, n, replace=False))
    return np.concatenate(members).astype(int), np.concatenate(non_members).astype(int)


@dataclass(frozen=True)
class MembershipAttack:
    """The MIA attackers of one model, one per member draw (fit_membership_attack)."""

    attackers: list[SVC]

    def efficacies(self, forget_conf: np.ndarray) -> np.ndarray:
        """Per draw: 100 * share of the forget samples called non-members."""
        if len(forget_conf) == 0:
            raise ValueError("MIA-efficacy of an empty forget set is undefined")
        return np.array([100.0 * float((attacker.predict(forget_conf) == 0).mean())
                         for attacker in self.attackers])

    def member_votes(self, conf: np.ndarray) -> np.ndarray:
        """Per sample: the share of draws (0 to 1) whose attacker calls it a member."""
        return np.mean([attacker.predict(conf) == 1 for attacker in self.attackers], axis=0)

    def members(self, conf: np.ndarray) -> np.ndarray:
        """Per sample: called a member by more than half of the draws, the per-sample call that
        agrees with MIA on average."""
        return self.member_votes(conf) > 0.5


def attacker_threads() -> int:
    """Threads fitting one evaluation's attackers at once: $QFORGET_MIA_THREADS, default 1.
    libsvm's training releases the GIL, so the draws fit in parallel; each draw's data and fit are
    the same whatever the count (the draws are made first, in order), so the results are too."""
    return max(1, int(os.environ.get("QFORGET_MIA_THREADS") or 1))


def fit_membership_attack(retain_conf: np.ndarray, retain_labels, test_conf: np.ndarray, test_labels,
                          draws: int = MIA_DRAWS, seed: int = 0) -> MembershipAttack:
    """`draws` attackers (SVC C=3, gamma "auto", RBF, on the true-class probability), each fitted on
    its own class-balanced member draw from the retain split against the whole test split;
    attacker_threads() of them at a time."""
    if draws < 1:
        raise ValueError("at least one draw")
    retain_labels, test_labels = np.asarray(retain_labels), np.asarray(test_labels)
    rng = np.random.default_rng(seed)
    samples = [balanced_member_draw(retain_labels, test_labels, rng) for _ in range(draws)]
    if len(samples[0][0]) == 0:
        raise ValueError("no class has both retain and test samples: no attacker can be fitted")

    def fit(sample) -> SVC:
        members, non_members = sample
        return SVC(C=3, gamma="auto", kernel="rbf").fit(
            np.concatenate([retain_conf[members], test_conf[non_members]]),
            np.r_[np.ones(len(members)), np.zeros(len(non_members))])

    threads = min(attacker_threads(), draws)
    if threads == 1:
        return MembershipAttack([fit(sample) for sample in samples])
    with ThreadPoolExecutor(threads) as pool:
        return MembershipAttack(list(pool.map(fit, samples)))


def mia_over_draws(attack: MembershipAttack, forget_conf: np.ndarray) -> dict:
    """MIA-efficacy of each of the attack's draws: {"mean", "sd" (between draws, ddof 1; 0 for one
    draw), "values" (per draw)}. The mean's own standard error is sd / sqrt(draws)."""
    values = attack.efficacies(forget_conf)
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "values": values.tolist()}


def mia_efficacy(
    model: nn.Module,
    retain: Split,
    test: Split,
    forget: Split,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> float:
    confidences = [
        true_class_probs(predict_probs(model, split.x, device), split.y)
        for split in (retain, test, forget)
    ]
    return mia_from_confidences(*confidences, seed=seed)


def per_sample_loss(probs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Cross-entropy of each sample, from softmax outputs (clamped: a saturated p_y = 1 gives 0)."""
    return -torch.log(probs.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12)).numpy()


def auc_percent(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """ROC AUC in percent of scores that should be higher for members (ties count one half)."""
    if len(member_scores) == 0 or len(non_member_scores) == 0:
        raise ValueError("an AUC needs scores on both sides")
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    return 100.0 * float(roc_auc_score(labels, np.r_[member_scores, non_member_scores]))


def membership_auc(
    forget_loss: np.ndarray,
    test_loss: np.ndarray,
    reference_forget_loss: np.ndarray | None = None,
    reference_test_loss: np.ndarray | None = None,
) -> float:
    """MIA-AUC from per-sample losses; with the reference's losses, MIA-AUC-cal."""
    if reference_forget_loss is None:
        return auc_percent(-forget_loss, -test_loss)
    return auc_percent(reference_forget_loss - forget_loss, reference_test_loss - test_loss)


def split_probs(model: nn.Module, forget: Split, retain: Split, test: Split,
                device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Softmax outputs on the three splits, keyed like the metrics they give: FA, RA, TA."""
    return {key: predict_probs(model, split.x, device)
            for key, split in (("FA", forget), ("RA", retain), ("TA", test))}


def split_attack(probs: dict[str, torch.Tensor], retain: Split, test: Split, seed: int = 0,
                 draws: int = MIA_DRAWS) -> MembershipAttack:
    """The membership attack of split_probs()' outputs (retain vs test)."""
    return fit_membership_attack(true_class_probs(probs["RA"], retain.y), retain.y.numpy(),
                                 true_class_probs(probs["TA"], test.y), test.y.numpy(), draws, seed)


def metrics_from_probs(probs: dict[str, torch.Tensor], forget: Split, retain: Split, test: Split,
                       seed: int = 0, attack: MembershipAttack | None = None,
                       draws: int = MIA_DRAWS) -> dict[str, float]:
    """FA, RA, TA, MIA (mean over `draws` attackers) and MIA_sd (their spread) from split_probs()'
    outputs; `attack`: split_attack() of these outputs, when the caller fitted it already."""
    splits = {"FA": forget, "RA": retain, "TA": test}
    metrics = {
        key: 100.0 * (probs[key].argmax(dim=1) == split.y).float().mean().item()
        for key, split in splits.items()
    }
    if attack is None:
        attack = split_attack(probs, retain, test, seed, draws)
    mia = mia_over_draws(attack, true_class_probs(probs["FA"], forget.y))
    metrics["MIA"], metrics["MIA_sd"] = mia["mean"], mia["sd"]
    return metrics


def evaluate(
    model: nn.Module,
    forget: Split,
    retain: Split,
    test: Split,
    device: str | torch.device = "cpu",
    seed: int = 0,
    draws: int = MIA_DRAWS,
) -> dict[str, float]:
    """FA, RA, TA (accuracy in percent), MIA (efficacy in percent, mean over `draws` attackers) and
    MIA_sd, one inference per split."""
    return metrics_from_probs(split_probs(model, forget, retain, test, device), forget, retain, test, seed,
                              draws=draws)


def evaluate_with_membership(
    model: nn.Module,
    forget: Split,
    retain: Split,
    test: Split,
    reference: nn.Module | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    draws: int = MIA_DRAWS,
) -> dict[str, float]:
    """evaluate()'s metrics plus MIA-AUC, and MIA-AUC-cal when a reference (the retrain
    reference) is given."""
    probs = split_probs(model, forget, retain, test, device)
    metrics = metrics_from_probs(probs, forget, retain, test, seed, draws=draws)
    forget_loss, test_loss = per_sample_loss(probs["FA"], forget.y), per_sample_loss(probs["TA"], test.y)
    metrics["MIA-AUC"] = membership_auc(forget_loss, test_loss)
    if reference is not None:
        ref_forget = per_sample_loss(predict_probs(reference, forget.x, device), forget.y)
        ref_test = per_sample_loss(predict_probs(reference, test.x, device), test.y)
        metrics["MIA-AUC-cal"] = membership_auc(forget_loss, test_loss, ref_forget, ref_test)
    return metrics


# How closely the integer export must repeat the fake-quantized model (export_fidelity): the share, in
# percent, of forget samples on which both must predict the same class, and on which both attackers
# must make the same membership call. Not 100: another CPU's kernels add in another order, and a value
# on a quantizer's rounding tie may land on the neighbouring code (workers/engine/export.py); FA and
# MIA then differ by at most 100 - this many points.
EXPORT_AGREEMENT = 99.0


def export_fidelity(
    model: nn.Module,
    integer: nn.Module,
    forget: Split,
    retain: Split,
    test: Split,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict:
    """Whether quantization brings forgetting back: FA, RA, TA and MIA of the fake-quantized model
    and of its integer export, side by side, and how far they agree on the forget set.

    integer: the inference model of the export, e.g. `load_integer_model(path)[0]` for a stored
    artifact, or `integer_model(export_integer(model), **spec.model_kwargs())`. Each model gets its
    own membership attackers, fitted on its own outputs, as an audit of either would. Returns
    {"fake_quantized": metrics, "integer": metrics, "prediction_agreement": percent of forget
    samples with the same predicted class, "membership_agreement": percent with the same
    membership call (the majority of the draws), "within_tolerance": both agreements at least EXPORT_AGREEMENT}."""
    results, predictions, calls = {}, {}, {}
    for name, network in (("fake_quantized", model), ("integer", integer)):
        probs = split_probs(network, forget, retain, test, device)
        attack = split_attack(probs, retain, test, seed)
        results[name] = metrics_from_probs(probs, forget, retain, test, seed, attack)
        predictions[name] = probs["FA"].argmax(dim=1)
        calls[name] = attack.members(true_class_probs(probs["FA"], forget.y))
    prediction_agreement = 100.0 * (predictions["fake_quantized"] == predictions["integer"]).float().mean().item()
    membership_agreement = 100.0 * float((calls["fake_quantized"] == calls["integer"]).mean())
    return {**results, "prediction_agreement": prediction_agreement,
            "membership_agreement": membership_agreement,
            "within_tolerance": min(prediction_agreement, membership_agreement) >= EXPORT_AGREEMENT}


def gaps(metrics: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """Absolute difference per metric to the reference, plus AG, their average."""
    result = {key: abs(metrics[key] - reference[key]) for key in METRIC_KEYS}
    result["AG"] = sum(result.values()) / len(METRIC_KEYS)
    return result


def ulira(retrained: np.ndarray, unlearned: np.ndarray, fpr: float = 0.01) -> dict:
    """A per-example test of unlearning in the spirit of U-LiRA (Hayes et al. 2024, arXiv 2403.01218):
    can an attacker who knows, per forget sample, how retrained and how unlearned models treat it
    tell an unlearned model from a retrained one?

    retrained, unlearned: K x n arrays, row k the logit-scaled true-class confidences
    (logit_confidence) of one model on the n forget samples: K models retrained without the forget
    set (different seeds) and K models unlearned by the method (from K originals or K seeds).

    Leave one out, symmetrically: for each k, the k-th model of each population is held out, and per
    sample a Gaussian is fitted to each population's other K - 1 values (a per-sample mean, a
    variance pooled over the samples: with a few models per-sample variances are too noisy to divide
    by, LiRA's "fixed variance" for few shadow models). Each held-out model's value on each sample is
    scored by the log likelihood ratio log N(x; unlearned) - log N(x; retrained). The 2 K n scores,
    unlearned ones positive, give:

    {"AUC": ROC AUC in percent (50: the unlearned models cannot be told from retrained ones, 100:
    always), "TPR@FPR": percent of unlearned (model, sample) pairs caught at the `fpr` false-positive
    rate, "FPR": fpr, "models": K, "samples": n, "sample_auc": per sample, the AUC in percent of its
    2 K scores (which samples give the method away)}.
    """
    retrained, unlearned = np.asarray(retrained, dtype=float), np.asarray(unlearned, dtype=float)
    if retrained.ndim != 2 or retrained.shape != unlearned.shape:
        raise ValueError("retrained and unlearned must both be K x n (models x samples) of one shape")
    k_models, n_samples = retrained.shape
    if k_models < 3 or n_samples < 1:
        raise ValueError("U-LiRA needs at least 3 models per population (2 left after holding one out)")
    positives, negatives = [], []
    for held_out in range(k_models):
        others = np.arange(k_models) != held_out
        fits = []
        for population in (unlearned, retrained):
            rest = population[others]
            variance = max(float(rest.var(axis=0, ddof=1).mean()), 1e-6)
            fits.append((rest.mean(axis=0), variance))

        def log_ratio(x):
            (mean_u, var_u), (mean_r, var_r) = fits
            return (-0.5 * (np.log(var_u) + (x - mean_u) ** 2 / var_u)
                    + 0.5 * (np.log(var_r) + (x - mean_r) ** 2 / var_r))

        positives.append(log_ratio(unlearned[held_out]))
        negatives.append(log_ratio(retrained[held_out]))
    positives, negatives = np.array(positives), np.array(negatives)  # K x n each
    scores = np.r_[positives.ravel(), negatives.ravel()]
    labels = np.r_[np.ones(positives.size), np.zeros(negatives.size)]
    false_positive, true_positive, _ = roc_curve(labels, scores)
    sample_auc = [auc_percent(positives[:, i], negatives[:, i]) for i in range(n_samples)]
    return {"AUC": 100.0 * float(roc_auc_score(labels, scores)),
            "TPR@FPR": 100.0 * float(true_positive[false_positive <= fpr].max()),
            "FPR": fpr, "models": k_models, "samples": n_samples, "sample_auc": sample_auc}
