"""Q-MUL: machine unlearning for quantized models (Tong et al. 2025, arXiv 2503.13917).

Q-MUL starts from the deployed quantized model and fine-tunes it with QAT on two losses:

- forget loss L_f = CE(f(x_f), y_similar): each forget sample is pushed towards a *similar label*,
  the class whose original probability is closest to the true class's one. The paper's argument:
  random labels (as in RL) inject arbitrary, noisy gradients that a low-bit model, with its coarse
  weight grid, turns into large jumps; the similar class is the smallest move that still forgets.
- retain loss L_r = CE(f(x_r), y_r), which keeps what should be kept.

*Adaptive gradient reweighting* sets the loss weights from the gradient norms G_f, G_r so that
neither side dominates: w_f = G_r / (G_f + G_r), w_r = G_f / (G_f + G_r), hence
w_f * G_f == w_r * G_r and w_f + w_r == 1.

What the paper could be checked for: no code is public, and its equations (7, 8, 13-16) did not
survive in any text readable here; the abstract says AGR "dynamically aligns parameter update
contributions from forgotten and retained data", and the group's follow-up (OEU, arXiv 2602.00567)
calls it "scalar gradient reweighting that cannot resolve directional conflicts between
gradients". Both fit one scalar weight per loss with w_f / w_r = G_r / G_f, which is what
w_f * G_f == w_r * G_r fixes; the normalisation w_f + w_r == 1 is our choice (w_f = G_r / G_f,
w_r = 1 has the same ratio and larger steps when G_f < G_r). Treat the formula as a
reconstruction until the equations are read.

Choices the paper leaves open, made here:

- Similar labels come from the original model's softmax, computed once before unlearning:
  argmin over j != y of |p_j - p_y|. For a correctly classified sample that is the runner-up class.
- G_f and G_r are recomputed at the start of every epoch on the current model, each as the mean
  over mini-batches of the L2 norm of the mini-batch loss gradient (all trainable parameters),
  in eval mode so that the estimate does not move BatchNorm running statistics. The forget norm
  uses the similar labels, i.e. the loss actually minimised. `grad_norm_batches` caps the number of
  (seeded, randomly chosen) mini-batches for large retain sets.
- An epoch is one pass over the forget set followed by one pass over the retain set (schedule
  "sequential", the default): RL's loop in the SalUn / l1-sparse reference code, which Q-MUL
  modifies (its similar labels replace RL's random labels), each step's loss weighted by w_f or
  w_r. Both sets keep the data set's train-time augmentation, as in the reference code; each
  loss is a mean over its own mini-batch.
- Plain SGD with momentum and weight decay at a constant learning rate and no gradient clipping
  (clipping would rescale what the reweighting balances); every parameter trains, the quantizers'
  step sizes and offsets included (QAT stays in the loop).
- Ablations: similar_labels=False draws seeded random labels != y once per run (RL-style);
  gradient_reweighting=False uses w_f = w_r = 1.

The schedule, and why "sequential" (measured with `python -m workers.benchmarks.bench`, the
cpu-cifar10 preset's data and models with 10 unlearning epochs; AG against the retrain reference,
per seed, mean +- std over seeds 0-2; bench-results/qmul-schedule-study, docs/engine.md):

    schedule        10% forgotten (250 of 2,500)   1% forgotten (25 of 2,500)
    no unlearning   5.65 +- 1.20                   3.25 +- 2.41
    cycled          20.02 +- 3.86                  36.80 +- 7.05
    proportional    15.38 +- 2.62                  -
    interleaved      3.87 +- 0.36                   7.12 +- 5.44
    sequential       3.55 +- 1.95                   4.98 +- 2.90

- "cycled", the first version, paired every retain mini-batch with a forget mini-batch, cycling
  the forget set: with 25 forget samples among 2,500 each was stepped on about 35 times per epoch
  and the model over-forgot (FA 0 against the reference's 57, MIA 100 against 43, RA -17 and TA
  -15 points; its loss-attack AUC fell to 1.5: the "forgotten" samples stood out by their high
  loss). Even at 10% it drove FA to 16 against 51. On the digits (seed 0) the same: AG 51 with 20
  forget samples, where no unlearning scores 0.1. As w_f -> 1 when the fitted forget loss's
  gradient vanishes, the retain loss then loses its weight as well.
- "proportional" (each retain batch carries its share of the forget set, one pass per epoch)
  steps on one or a few forget samples per batch at full weight w_f: single-sample gradients are
  far larger than the batch-mean norm G_f that set w_f, and RA collapsed (41 against 58).
- "interleaved" (one pass over each set, the forget batches spread among the retain batches, a
  step holding both in one forward pass) and "sequential" both see each forget sample once per
  epoch and stay close to the reference; sequential has the lower AG at both sizes (within the
  seed spread at this scale) and is the reading closest to the code Q-MUL builds on, hence the
  default. At 1% no schedule beats doing nothing: 25 samples of a model that does not memorise
  (train 60%, test 53%) leave too little to forget.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import Split
from .training import bf16_autocast, compiled_forward, predict_probs, shuffled_batches


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
    bf16: bool = False,
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
        with bf16_autocast(device, bf16):
            logits = model(x)
        grads = torch.autograd.grad(F.cross_entropy(logits.float(), y), params, allow_unused=True)
        squares = [g.pow(2).sum() for g in grads if g is not None]
        norms.append(torch.stack(squares).sum().sqrt().item())
    model.train(was_training)
    return sum(norms) / len(norms)


FORGET_SCHEDULES = ("sequential", "interleaved", "proportional", "cycled")


def qmul_steps(
    schedule: str, n_forget: int, n_retain: int, batch_size: int, generator: torch.Generator
) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """One epoch of Q-MUL as a list of (forget index, retain index) steps; None: no such batch.

    - "sequential" (the default): RL's loop, a shuffled pass over the forget set, then one over
      the retain set, in batches of batch_size.
    - "interleaved": one shuffled pass over each set in batches of batch_size; the smaller
      number of batches is spread evenly over the larger, and a step holding both goes through
      one forward pass.
    - "proportional": one pass over each set, every retain batch carrying its share
      (about n_forget / number of retain batches) of the forget samples.
    - "cycled" (the first version): every retain batch is paired with a full forget batch,
      cycling the forget set (each forget sample is seen about n_retain / n_forget times as often
      as a retain sample).
    """
    if schedule not in FORGET_SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {FORGET_SCHEDULES}")
    retain = list(shuffled_batches(n_retain, batch_size, generator))
    if schedule == "cycled":
        forget: list[torch.Tensor] = []
        while len(forget) < len(retain):
            forget += shuffled_batches(n_forget, batch_size, generator)
        return list(zip(forget[: len(retain)], retain))
    if schedule == "proportional":
        chunks = torch.randperm(n_forget, generator=generator).tensor_split(len(retain))
        return [(chunk if len(chunk) else None, index) for chunk, index in zip(chunks, retain)]
    forget = list(shuffled_batches(n_forget, batch_size, generator))
    if schedule == "sequential":
        return [(index, None) for index in forget] + [(None, index) for index in retain]
    few, many = (forget, retain) if len(forget) <= len(retain) else (retain, forget)
    # Batch i of the smaller set goes to step floor((i + 1/2) * len(many) / len(few)).
    slots = {int((i + 0.5) * len(many) / len(few)): batch for i, batch in enumerate(few)}
    paired = [(slots.get(step), batch) for step, batch in enumerate(many)]
    return paired if few is forget else [(f, r) for r, f in paired]


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
    schedule: str = "sequential"  # how forget and retain batches meet: see qmul_steps


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
    compile_model: bool = False,
    bf16: bool = False,
) -> UnlearnResult:
    """Unlearn `forget` from a copy of `model` (the original is left untouched). compile_model:
    run the training passes through torch.compile (training.compiled_forward); bf16: under
    training.bf16_autocast."""
    if len(forget) == 0 or len(retain) == 0:
        raise ValueError("Q-MUL needs a non-empty forget set and a non-empty retain set")
    if config.schedule not in FORGET_SCHEDULES:
        raise ValueError(f"unknown schedule {config.schedule!r}; known: {FORGET_SCHEDULES}")
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
    forward = compiled_forward(model) if compile_model else model
    history = []
    for epoch in tqdm(range(config.epochs), desc="q-mul", disable=not progress, leave=False):
        norm_args = {"device": device, "batch_size": config.batch_size,
                     "max_batches": config.grad_norm_batches, "seed": config.seed + epoch, "bf16": bf16}
        forget_norm = expected_grad_norm(forward, forget, forget_labels, **norm_args)
        retain_norm = expected_grad_norm(forward, retain, retain.y, **norm_args)
        if config.gradient_reweighting:
            w_f, w_r = gradient_reweighting(forget_norm, retain_norm)
        else:
            w_f, w_r = 1.0, 1.0

        model.train()
        sums = {"forget_loss": 0.0, "retain_loss": 0.0, "loss": 0.0}
        counts = {"forget_loss": 0, "retain_loss": 0, "loss": 0}
        steps = qmul_steps(config.schedule, len(forget), len(retain), config.batch_size,
                           generator)
        for forget_index, retain_index in steps:
            parts = []
            if forget_index is not None:
                parts.append(("forget_loss", w_f,
                              *forget_targets.training_batch(forget_index, generator, device)))
            if retain_index is not None:
                parts.append(("retain_loss", w_r,
                              *retain.training_batch(retain_index, generator, device)))
            # One forward pass over whatever the step holds: BatchNorm sees the mixed batch,
            # and each loss is a mean over its own samples.
            with bf16_autocast(device, bf16):
                logits = forward(torch.cat([x for _, _, x, _ in parts])).float()
            loss, start = 0.0, 0
            for name, weight, x, y in parts:
                part_loss = F.cross_entropy(logits[start : start + len(x)], y)
                loss = loss + weight * part_loss
                start += len(x)
                sums[name] += part_loss.item()
                counts[name] += 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] += loss.item()
            counts["loss"] += 1
        history.append({
            "epoch": epoch, "w_f": w_f, "w_r": w_r, "G_f": forget_norm, "G_r": retain_norm,
            "steps": len(steps),
            **{name: sums[name] / max(counts[name], 1) for name in sums},
        })
    return UnlearnResult(model, history)
