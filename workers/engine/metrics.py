"""Unlearning metrics: FA, RA, TA, MIA-efficacy and the gaps to the retrain reference.

MIA-efficacy follows SalUn / l1-sparse: a membership-inference attacker (an RBF SVM on the softmax
probability of the true class) is fitted on retain samples (members) versus test samples
(non-members); the score is the share of forget samples it calls non-members, in percent. Higher
means more forgotten; the target is the retrain reference's value, not 100.
"""

import numpy as np
import torch
from sklearn.svm import SVC
from torch import nn

from .data import Split
from .training import predict_probs

METRIC_KEYS = ("FA", "RA", "TA", "MIA")


def true_class_probs(probs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return probs.gather(1, labels[:, None]).numpy()  # N x 1: the attacker's one feature


def mia_from_confidences(
    retain_conf: np.ndarray, test_conf: np.ndarray, forget_conf: np.ndarray, seed: int = 0
) -> float:
    """Fit the attacker on n retain (label 1) and n test (label 0) confidences, n = min of sizes,
    each drawn with a seeded permutation; return 100 * share of forget samples predicted 0."""
    if len(forget_conf) == 0:
        raise ValueError("MIA-efficacy of an empty forget set is undefined")
    rng = np.random.default_rng(seed)
    n = min(len(retain_conf), len(test_conf))
    members = retain_conf[rng.permutation(len(retain_conf))[:n]]
    non_members = test_conf[rng.permutation(len(test_conf))[:n]]
    attacker = SVC(C=3, gamma="auto", kernel="rbf")
    attacker.fit(np.concatenate([members, non_members]), np.r_[np.ones(n), np.zeros(n)])
    return 100.0 * float((attacker.predict(forget_conf) == 0).mean())


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


def evaluate(
    model: nn.Module,
    forget: Split,
    retain: Split,
    test: Split,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """FA, RA, TA (accuracy in percent) and MIA (efficacy in percent), one inference per split."""
    splits = {"FA": forget, "RA": retain, "TA": test}
    probs = {key: predict_probs(model, split.x, device) for key, split in splits.items()}
    metrics = {
        key: 100.0 * (probs[key].argmax(dim=1) == split.y).float().mean().item()
        for key, split in splits.items()
    }
    conf = {key: true_class_probs(probs[key], split.y) for key, split in splits.items()}
    metrics["MIA"] = mia_from_confidences(conf["RA"], conf["TA"], conf["FA"], seed)
    return metrics


def gaps(metrics: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """Absolute difference per metric to the reference, plus AG, their average."""
    result = {key: abs(metrics[key] - reference[key]) for key in METRIC_KEYS}
    result["AG"] = sum(result.values()) / len(METRIC_KEYS)
    return result
