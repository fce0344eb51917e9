"""Coresets: a fraction of a split chosen to stand for all of it in a training pass.

`select_coreset(model, split, fraction, selector, seed)` returns the chosen indices. Every selector
keeps each class's share of the split (round(fraction * class size), at least one sample of
each class present), so that selectors differ only in which samples of a class they keep.

| selector | keeps |
|---|---|
| `random` | a uniform draw (the baseline every other selector must beat at the same size) |
| `res` | Relative Entropy Score (after QuaRC, arXiv 2507.17768): the samples with the largest KL(p_fp || p_q), the full-precision view's output distribution against the quantized model's, i.e. the samples that carry the quantization error |
| `jscds` | after JSCDS (arXiv 2407.00362): the samples whose Jensen-Shannon divergence to their class centre is closest to the class's mean divergence (typical samples, neither the centre nor outliers) |

The formulas are ours: neither paper's exact equations were available (QuaRC's RES and its
layer weighting, JSCDS's embedding-to-distribution step). Our choices:

- RES(x) = KL(p_fp(x) || p_q(x)) = sum_c p_fp,c (log p_fp,c - log p_q,c), p the softmax of the
  logits in eval mode; p_q from the quantized model, p_fp from the same model under
  quantization.quantization_off (its latent float weights, quantizers bypassed), or from a given
  float model (bootstrap QAT from a float checkpoint).
- JSCDS: e(x) the penultimate features (the input of the model's last Linear layer), P(x) =
  softmax(e(x)), the class centre Q_c = softmax(mean of e over the class), JS(P, Q) = KL(P||M)/2 +
  KL(Q||M)/2 with M = (P + Q)/2; per class, keep the samples with the smallest |JS - mean JS|.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .data import Split
from .quantization import quantization_off
from .training import predict_logits

SELECTORS = ("random", "res", "jscds")


def select_coreset(
    model: nn.Module | None,
    split: Split,
    fraction: float,
    selector: str,
    seed: int = 0,
    device: str | torch.device = "cpu",
    float_model: nn.Module | None = None,
) -> torch.Tensor:
    """Indices (sorted, int64, CPU) of the coreset of split. model: the quantized model the
    scores are taken from (unused by "random"); float_model: the full-precision model for "res"
    (default: model under quantization_off)."""
    if selector not in SELECTORS:
        raise ValueError(f"unknown coreset selector {selector!r}; known: {SELECTORS}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"coreset fraction must lie in (0, 1], not {fraction}")
    if selector == "random":
        scores = torch.rand(len(split), generator=torch.Generator().manual_seed(seed))
    elif selector == "res":
        scores = relative_entropy_scores(model, split.x, device, float_model)
    else:
        scores = -jscds_distance(model, split, device)  # closest to the class mean JS first
    return top_per_class(scores, split.y.cpu(), fraction)


def top_per_class(scores: torch.Tensor, labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """The highest-scoring round(fraction * n_c) samples of each class c (at least one), sorted."""
    chosen = []
    for c in labels.unique():
        members = torch.where(labels == c)[0]
        k = max(1, round(fraction * len(members)))
        chosen.append(members[scores[members].topk(k).indices])
    return torch.cat(chosen).sort().values


def relative_entropy_scores(model: nn.Module, x: torch.Tensor, device: str | torch.device = "cpu",
                            float_model: nn.Module | None = None) -> torch.Tensor:
    """Per-sample KL(p_fp || p_q) (module docstring)."""
    log_q = F.log_softmax(predict_logits(model, x, device).float(), dim=1)
    if float_model is None:
        with quantization_off(model):
            log_p = F.log_softmax(predict_logits(model, x, device).float(), dim=1)
    else:
        log_p = F.log_softmax(predict_logits(float_model, x, device).float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def penultimate_features(model: nn.Module, x: torch.Tensor, device: str | torch.device = "cpu",
                         batch_size: int = 512) -> torch.Tensor:
    """The input of model's last Linear layer for each sample, in eval mode, on the CPU."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    captured = []
    handle = last.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0].detach().float().cpu()))
    try:
        predict_logits(model, x, device, batch_size)
    finally:
        handle.remove()
    return torch.cat(captured).flatten(1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise Jensen-Shannon divergence (nats) between distributions p and q (rows sum to 1)."""
    m = (p + q) / 2
    eps = 1e-12
    kl = lambda a: (a * ((a + eps).log() - (m + eps).log())).sum(dim=1)  # noqa: E731
    return (kl(p) + kl(q)) / 2


def jscds_distance(model: nn.Module, split: Split, device: str | torch.device = "cpu") -> torch.Tensor:
    """Per sample, |JS(sample, class centre) - mean JS of its class| (module docstring)."""
    features = penultimate_features(model, split.x, device)
    labels = split.y.cpu()
    distance = torch.empty(len(labels))
    for c in labels.unique():
        members = torch.where(labels == c)[0]
        e = features[members]
        p = F.softmax(e, dim=1)
        centre = F.softmax(e.mean(dim=0, keepdim=True), dim=1).expand_as(p)
        js = js_divergence(p, centre)
        distance[members] = (js - js.mean()).abs()
    return distance
