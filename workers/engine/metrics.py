"""Unlearning metrics: FA, RA, TA, MIA-efficacy and the gaps to the retrain reference, plus two
threshold-free membership tests.

MIA-efficacy follows SalUn / l1-sparse: a membership-inference attacker (an RBF SVM on the softmax
probability of the true class) is fitted on retain samples (members) versus test samples
(non-members); the score is the share of forget samples it calls non-members, in percent. Higher
means more forgotten; the target is the retrain reference's value, not 100.

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

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.svm import SVC
from torch import nn

from .data import Split
from .training import predict_probs

METRIC_KEYS = ("FA", "RA", "TA", "MIA")


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
    """The MIA-efficacy attacker, fitted; its predict() gives 1 for "member", 0 for "non-member".
    Public so that per-sample membership calls use the very classifier behind MIA."""
    rng = np.random.default_rng(seed)
    n = min(len(retain_conf), len(test_conf))
    members = retain_conf[rng.permutation(len(retain_conf))[:n]]
    non_members = test_conf[rng.permutation(len(test_conf))[:n]]
    attacker = SVC(C=3, gamma="auto", kernel="rbf")
    attacker.fit(np.concatenate([members, non_members]), np.r_[np.ones(n), np.zeros(n)])
    return attacker


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


def metrics_from_probs(probs: dict[str, torch.Tensor], forget: Split, retain: Split, test: Split,
                       seed: int = 0, attacker: SVC | None = None) -> dict[str, float]:
    """FA, RA, TA and MIA from split_probs()' outputs; `attacker`: membership_attacker() of these
    outputs, when the caller fitted it already (the fit is the costly part on large splits)."""
    splits = {"FA": forget, "RA": retain, "TA": test}
    metrics = {
        key: 100.0 * (probs[key].argmax(dim=1) == split.y).float().mean().item()
        for key, split in splits.items()
    }
    conf = {key: true_class_probs(probs[key], split.y) for key, split in splits.items()}
    metrics["MIA"] = mia_from_confidences(conf["RA"], conf["TA"], conf["FA"], seed, attacker)
    return metrics


def evaluate(
    model: nn.Module,
    forget: Split,
    retain: Split,
    test: Split,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """FA, RA, TA (accuracy in percent) and MIA (efficacy in percent), one inference per split."""
    return metrics_from_probs(split_probs(model, forget, retain, test, device), forget, retain, test, seed)


def evaluate_with_membership(
    model: nn.Module,
    forget: Split,
    retain: Split,
    test: Split,
    reference: nn.Module | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """evaluate()'s four metrics plus MIA-AUC, and MIA-AUC-cal when a reference (the retrain
    reference) is given."""
    probs = split_probs(model, forget, retain, test, device)
    metrics = metrics_from_probs(probs, forget, retain, test, seed)
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
    own membership attacker, fitted on its own outputs, as an audit of either would. Returns
    {"fake_quantized": metrics, "integer": metrics, "prediction_agreement": percent of forget
    samples with the same predicted class, "membership_agreement": percent with the same
    membership call, "within_tolerance": both agreements at least EXPORT_AGREEMENT}."""
    results, predictions, calls = {}, {}, {}
    for name, network in (("fake_quantized", model), ("integer", integer)):
        probs = split_probs(network, forget, retain, test, device)
        conf = {key: true_class_probs(probs[key], split.y)
                for key, split in (("FA", forget), ("RA", retain), ("TA", test))}
        attacker = membership_attacker(conf["RA"], conf["TA"], seed)
        results[name] = metrics_from_probs(probs, forget, retain, test, seed, attacker)
        predictions[name] = probs["FA"].argmax(dim=1)
        calls[name] = attacker.predict(conf["FA"])
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
