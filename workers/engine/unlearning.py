"""Q-MUL: machine unlearning for quantized models (Tong et al. 2025, arXiv 2503.13917).

Q-MUL starts from the deployed quantized model and fine-tunes it with QAT on two losses at once:

- forget loss L_f = CE(f(x_f), y_similar): each forget sample is pushed towards a *similar label*,
  the class whose original probability is closest to the true class's one. The paper's argument:
  random labels (as in RL) inject arbitrary, noisy gradients that a low-bit model, with its coarse
  weight grid, turns into large jumps; the similar class is the smallest move that still forgets.
- retain loss L_r = CE(f(x_r), y_r), which keeps what should be kept.

*Adaptive gradient reweighting* sets the loss weights from the gradient norms G_f, G_r so that
neither side dominates the update: w_f = G_r / (G_f + G_r), w_r = G_f / (G_f + G_r), hence
w_f * G_f == w_r * G_r and w_f + w_r == 1. (The paper's equations were not available to us; these
formulas follow its prose. Check them against the paper before quoting results as Q-MUL's.)

Choices the paper leaves open, made here:

- Similar labels come from the original model's softmax, computed once before unlearning:
  argmin over j != y of |p_j - p_y|. For a correctly classified sample that is the runner-up class.
- G_f and G_r are recomputed at the start of every epoch on the current model, each as the mean
  over mini-batches of the L2 norm of the mini-batch loss gradient (all trainable parameters),
  in eval mode so that the estimate does not move BatchNorm running statistics. The forget norm
  uses the similar labels, i.e. the loss actually minimised. `grad_norm_batches` caps the number of
  (seeded, randomly chosen) mini-batches for large retain sets.
- An epoch is one shuffled pass over the retain set; each retain mini-batch is paired with the next
  forget mini-batch, cycling (and reshuffling) the smaller forget set. The pair goes through one
  forward pass, so BatchNorm sees the mixed batch; each loss is a mean over its own samples. Both
  sets keep the data set's train-time augmentation, as in SalUn's reference code.
- Plain SGD with momentum and weight decay at a constant learning rate and no gradient clipping
  (clipping would rescale what the reweighting balances); every parameter trains, the quantizers'
  step sizes and offsets included (QAT stays in the loop).
- A consequence worth knowing: since w_f * G_f == w_r * G_r and w_f + w_r == 1, each weighted
  term has about the size of the smaller norm. When the original model fits the retain set
  (G_r << G_f) the first epochs move gently and w_f grows as the retain loss wakes up; the
  learning rate, not the weights, sets how fast forgetting goes.
- Ablations: similar_labels=False draws seeded random labels != y once per run (RL-style);
  gradient_reweighting=False uses w_f = w_r = 1.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import Split
from .training import predict_probs, shuffled_batches


def similar_labels(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For each row, the class j != y whose probability is closest to the true class's."""
    true_prob = probs.gather(1, labels[:, None])
    distance = (probs - true_prob).abs()
    distance.scatter_(1, labels[:, None], math.inf)  # the true class is never a candidate
    return distance.argmin(dim=1)


def random_other_labels(labels: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """Uniform random labels, each different from the true one."""
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes


def gradient_reweighting(forget_grad_norm: float, retain_grad_norm: float) -> tuple[float, float]:
    """Loss weights (w_f, w_r) with w_f * G_f == w_r * G_r and w_f + w_r == 1."""
    if forget_grad_norm < 0 or retain_grad_norm < 0:
        raise ValueError("gradient norms must be non-negative")
    total = forget_grad_norm + retain_grad_norm
    if total == 0:  # both losses are flat: nothing to balance
        return 0.5, 0.5
    return retain_grad_norm / total, forget_grad_norm / total


def expected_grad_norm(
    model: nn.Module,
    split: Split,
    labels: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    max_batches: int | None = None,
    seed: int = 0,
) -> float:
    """Mean over mini-batches of ||grad of CE(model(x), labels)||_2, in eval mode.

    Mini-batches come from a seeded shuffle, so max_batches picks a random subset of them.
    The model's gradients and train/eval mode are left as they were found.
    """
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    batches = shuffled_batches(len(split), batch_size, generator)[:max_batches]
    norms = []
    for index in batches:
        x, y = split.x[index].to(device), labels[index].to(device)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, allow_unused=True)
        squares = [g.pow(2).sum() for g in grads if g is not None]
        norms.append(torch.stack(squares).sum().sqrt().item())
    model.train(was_training)
    return sum(norms) / len(norms)


@dataclass
class QMulConfig:
    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    similar_labels: bool = True
    gradient_reweighting: bool = True
    seed: int = 0
    grad_norm_batches: int | None = None  # None: estimate G_f, G_r over the whole sets


@dataclass
class UnlearnResult:
    model: nn.Module
    history: list[dict]


def qmul_unlearn(
    model: nn.Module,
    forget: Split,
    retain: Split,
    config: QMulConfig,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> UnlearnResult:
    """Unlearn `forget` from a copy of `model` (the original is left untouched)."""
    if len(forget) == 0 or len(retain) == 0:
        raise ValueError("Q-MUL needs a non-empty forget set and a non-empty retain set")
    model = copy.deepcopy(model).to(device)
    original_probs = predict_probs(model, forget.x, device)
    if config.similar_labels:
        forget_labels = similar_labels(original_probs, forget.y)
    else:
        forget_labels = random_other_labels(forget.y, original_probs.shape[1], config.seed)
    forget_targets = Split(forget.x, forget_labels, forget.augment)

    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    generator = torch.Generator().manual_seed(config.seed)
    forget_batches = iter(())
    history = []
    for epoch in tqdm(range(config.epochs), desc="q-mul", disable=not progress, leave=False):
        norm_args = dict(device=device, batch_size=config.batch_size,
                         max_batches=config.grad_norm_batches, seed=config.seed + epoch)
        forget_norm = expected_grad_norm(model, forget, forget_labels, **norm_args)
        retain_norm = expected_grad_norm(model, retain, retain.y, **norm_args)
        if config.gradient_reweighting:
            w_f, w_r = gradient_reweighting(forget_norm, retain_norm)
        else:
            w_f, w_r = 1.0, 1.0

        model.train()
        totals = {"forget_loss": 0.0, "retain_loss": 0.0, "loss": 0.0}
        retain_batches = shuffled_batches(len(retain), config.batch_size, generator)
        for retain_index in retain_batches:
            forget_index = next(forget_batches, None)
            if forget_index is None:  # forget set exhausted: reshuffle and cycle
                forget_batches = iter(shuffled_batches(len(forget), config.batch_size, generator))
                forget_index = next(forget_batches)
            x_f, y_f = forget_targets.training_batch(forget_index, generator, device)
            x_r, y_r = retain.training_batch(retain_index, generator, device)
            logits = model(torch.cat([x_f, x_r]))
            forget_loss = F.cross_entropy(logits[: len(x_f)], y_f)
            retain_loss = F.cross_entropy(logits[len(x_f) :], y_r)
            loss = w_f * forget_loss + w_r * retain_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals["forget_loss"] += forget_loss.item()
            totals["retain_loss"] += retain_loss.item()
            totals["loss"] += loss.item()
        steps = len(retain_batches)
        history.append({
            "epoch": epoch, "w_f": w_f, "w_r": w_r, "G_f": forget_norm, "G_r": retain_norm,
            **{name: total / steps for name, total in totals.items()},
        })
    return UnlearnResult(model, history)
