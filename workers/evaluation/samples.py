"""Per-sample figures of a version: right or wrong, the true label's confidence (as a probability and
logit-scaled), the membership attackers' call, and histograms of the membership scores."""

from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, insert

from service.core.models import SampleScore, utcnow
from workers import engine as qf
from workers.engine.metrics import (
    logit_confidence,
    metrics_from_probs,
    per_sample_loss,
    split_attack,
    split_probs,
    true_class_probs,
)


@dataclass(frozen=True)
class SampleAssessment:
    """A version's FA, RA, TA and MIA, its per-sample figures on the forget split (in the split's
    order), and the membership scores (per-sample loss, -ln p of the true label) of the forget and
    test splits: all from one inference per split."""

    metrics: dict[str, float]
    correct: np.ndarray
    confidence: np.ndarray
    confidence_logit: np.ndarray  # log(p / (1 - p)) of the true label, finite where p rounds to 1
    member: np.ndarray
    forget_loss: np.ndarray
    test_loss: np.ndarray


def assess_samples(network, forget: qf.Split, retain: qf.Split, test: qf.Split, device: str,
                   seed: int = 0) -> SampleAssessment:
    """The metrics (as qf.evaluate: MIA the mean over the attackers' draws, with MIA_sd) and, per
    forget sample: predicted right, the true label's softmax probability and its logit, and the
    membership call (called a member by most of the attackers behind MIA, fitted on this version's
    retain vs test)."""
    probs = split_probs(network, forget, retain, test, device)
    attack = split_attack(probs, retain, test, seed)
    forget_confidence = true_class_probs(probs["FA"], forget.y)
    return SampleAssessment(
        metrics=metrics_from_probs(probs, forget, retain, test, seed, attack),  # one fit serves both
        correct=(probs["FA"].argmax(dim=1) == forget.y).numpy(),
        confidence=forget_confidence[:, 0],
        confidence_logit=logit_confidence(probs["FA"], forget.y),
        member=attack.members(forget_confidence),
        forget_loss=per_sample_loss(probs["FA"], forget.y),
        test_loss=per_sample_loss(probs["TA"], test.y),
    )


# Membership score histograms: the loss spans many decades (a memorised sample has ~1e-6), so
# the bins are log-spaced, with a first bin [0, 1e-6) for saturated confidences.
SCORE_BIN_EDGES = [0.0, *np.geomspace(1e-6, 30.0, 31).round(8).tolist()]


def score_histogram(losses: np.ndarray) -> list[int]:
    clipped = np.clip(losses, 0.0, SCORE_BIN_EDGES[-1])
    return np.histogram(clipped, bins=SCORE_BIN_EDGES)[0].astype(int).tolist()


def record_sample_scores(session, version_id: int, sample_ids: list[int], assessment: SampleAssessment) -> None:
    """Store (replacing earlier ones) a version's figures on the given samples, in the split's order."""
    now = utcnow()
    for start in range(0, len(sample_ids), 5000):  # bounded statement size on both databases
        chunk = sample_ids[start:start + 5000]
        session.execute(delete(SampleScore).where(SampleScore.version_id == version_id,
                                                  SampleScore.sample_id.in_(chunk)))
    if sample_ids:
        session.execute(insert(SampleScore), [
            {"version_id": version_id, "sample_id": sample_id, "correct": bool(assessment.correct[i]),
             "confidence": float(assessment.confidence[i]),
             "confidence_logit": float(assessment.confidence_logit[i]), "member": bool(assessment.member[i]),
             "computed_at": now}
            for i, sample_id in enumerate(sample_ids)
        ])
