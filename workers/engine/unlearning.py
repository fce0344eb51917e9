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

The weights are the authors' public code's (GitHub Green-Edge-AI-Group/MU-Q-MUL, built on the
SalUn code), which also fixes what the paper's text leaves open. Where that code departs from the
paper's text (section 4), the text is the default here and the code's behaviour an option of
QMulConfig; QMulPublicConfig turns all of them on ("Q-MUL as its authors ran it", below).

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

Q-MUL as its authors ran it (QMulConfig options, each off by default; QMulPublicConfig, method
"qmul-public", sets them all with the code's batch 256):

- relabel_every_epoch: similar labels chosen again at the start of every epoch from the current
  model in train mode (the code relabels inside its epoch function, after the model was put in
  train mode, so BatchNorm normalises with batch statistics and its running statistics move);
  forget batches of batch_size in the set's order, un-augmented.
- label_distance "logit": |z_j - p_y|, the raw logit of class j against the true class's
  probability, where the text compares probabilities.
- label_index "unmapped": the argmin is taken over the distance vector with the true class removed
  and that position is used as the label, so a class above y comes out one lower (and the class
  just above y comes out as y itself: the forget loss then pulls towards the true class).
- grad_norm "tensor-sum": G is the mean over every mini-batch of the sum over parameter tensors of
  each tensor's L2 norm (not the L2 norm of the whole gradient), measured in train mode.
- lr_schedule "cosine": the learning rate follows a cosine from lr at the first epoch towards 0
  after the last (stepped once per epoch, as torch's CosineAnnealingLR with T_max = epochs).
- schedule "union": the code's loop for CIFAR-100 and Tiny-ImageNet (eq. 13): one shuffled pass
  over forget + retain, each sample's CE weighted by w_f or w_r, loss = sum(w_i * ce_i) / batch
  size. For CIFAR-10 and SVHN the code runs "sequential", which is what the preset keeps.

What each option does to FA, RA, TA, MIA and AG, measured one at a time on the digits:
docs/bench/qmul-public-code.md (docs/engine.md summarises it).

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

from .coresets import SELECTORS, select_coreset
from .data import Split
from .training import bf16_autocast, compiled_forward, predict_logits, predict_probs, shuffled_batches


def similar_labels(
    probs: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None,
    map_index: bool = True,
) -> torch.Tensor:
    """For each row, the class j != y whose probability is closest to the true class's.

    logits: measure |logit_j - p_y| instead of |p_j - p_y| (the public code's distance).
    map_index=False: return the position of the minimum in the row with the true class removed,
    not mapped back to a class (the public code's index): classes above y come out one lower.
    """
    true_prob = probs.gather(1, labels[:, None])
    distance = ((probs if logits is None else logits) - true_prob).abs()
    distance.scatter_(1, labels[:, None], math.inf)  # the true class is never a candidate
    chosen = distance.argmin(dim=1)
    # Both readings order the candidates alike, so the first minimum is the same candidate.
    return chosen if map_index else chosen - (chosen > labels).long()


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


GRAD_NORMS = ("global", "tensor-sum")
LABEL_DISTANCES = ("probability", "logit")
LABEL_INDICES = ("mapped", "unmapped")
LR_SCHEDULES = ("constant", "cosine")


def expected_grad_norm(
    model: nn.Module,
    split: Split,
    labels: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    max_batches: int | None = None,
    seed: int = 0,
    bf16: bool = False,
    norm: str = "global",
) -> float:
    """Mean over mini-batches of ||grad of CE(model(x), labels)||_2, in eval mode.

    norm "tensor-sum" (the public code's): each batch's value is the sum over parameter tensors
    of their gradients' L2 norms, measured in train mode (BatchNorm uses batch statistics and its
    running statistics move). Mini-batches come from a seeded shuffle, so max_batches picks a
    random subset of them. The model's gradients and train/eval mode are left as they were found.
    """
    if norm not in GRAD_NORMS:
        raise ValueError(f"unknown grad norm {norm!r}; known: {GRAD_NORMS}")
    was_training = model.training
    model.train(norm == "tensor-sum")
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    batches = shuffled_batches(len(split), batch_size, generator)[:max_batches]
    norms = []
    for index in batches:
        x, y = split.x[index].to(device), labels[index].to(device)
        with bf16_autocast(device, bf16):
            logits = model(x)
        grads = torch.autograd.grad(F.cross_entropy(logits.float(), y), params, allow_unused=True)
        squares = torch.stack([g.float().pow(2).sum() for g in grads if g is not None])
        value = squares.sqrt().sum() if norm == "tensor-sum" else squares.sum().sqrt()
        norms.append(value.item())
    model.train(was_training)
    return sum(norms) / len(norms)


FORGET_SCHEDULES = ("sequential", "interleaved", "proportional", "cycled", "union")


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
    - "union" (the public code's loop for CIFAR-100 and Tiny-ImageNet): one shuffled pass over
      forget + retain in batches of batch_size, each batch split into its forget and retain part.
    """
    if schedule not in FORGET_SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {FORGET_SCHEDULES}")
    if schedule == "union":
        steps = []
        for index in shuffled_batches(n_forget + n_retain, batch_size, generator):
            is_forget = index < n_forget
            forget, retain = index[is_forget], index[~is_forget] - n_forget
            steps.append((forget if len(forget) else None, retain if len(retain) else None))
        return steps
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
    # The public code's departures from the paper's text (module docstring), off by default:
    relabel_every_epoch: bool = False  # similar labels again each epoch, current model, train mode
    label_distance: str = "probability"  # "logit": |z_j - p_y|
    label_index: str = "mapped"  # "unmapped": the position in the row without y, not mapped back
    grad_norm: str = "global"  # "tensor-sum": sum of per-tensor L2 norms, in train mode
    lr_schedule: str = "constant"  # "cosine": annealed towards 0 over the epochs
    # The retain pass over a coreset of the retain set (coresets.select_coreset, chosen once from
    # the model before unlearning): its fraction, None for the whole set, and its selector. Off:
    # measured not to keep AG at a third of the time (docs/bench/coresets.md).
    retain_coreset: float | None = None
    coreset_selector: str = "random"

    def validate(self) -> None:
        for value, known in [(self.schedule, FORGET_SCHEDULES), (self.grad_norm, GRAD_NORMS),
                             (self.label_distance, LABEL_DISTANCES),
                             (self.label_index, LABEL_INDICES), (self.lr_schedule, LR_SCHEDULES)]:
            if value not in known:
                raise ValueError(f"unknown Q-MUL option {value!r}; known: {known}")
        if self.coreset_selector not in SELECTORS:
            raise ValueError(f"unknown coreset selector {self.coreset_selector!r}; known: {SELECTORS}")


@dataclass
class QMulPublicConfig(QMulConfig):
    """Q-MUL as the authors' public code runs it on CIFAR-10: every departure from the paper's
    text on, with the code's optimiser (SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256,
    10 epochs) and its CIFAR-10 / SVHN loop ("sequential"; "union" is its CIFAR-100 /
    Tiny-ImageNet loop)."""

    batch_size: int = 256
    relabel_every_epoch: bool = True
    label_distance: str = "logit"
    label_index: str = "unmapped"
    grad_norm: str = "tensor-sum"
    lr_schedule: str = "cosine"


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
    config.validate()
    model = copy.deepcopy(model).to(device)
    if config.retain_coreset is not None:
        retain = retain.subset(select_coreset(model, retain, config.retain_coreset,
                                              config.coreset_selector, config.seed, device))
    if config.similar_labels:
        forget_labels = forget_similar_labels(model, forget, config, device, train_mode=False)
    else:
        num_classes = predict_probs(model, forget.x[:1], device).shape[1]
        forget_labels = random_other_labels(forget.y, num_classes, config.seed)
    relabel = config.similar_labels and config.relabel_every_epoch

    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
                 if config.lr_schedule == "cosine" else None)
    generator = torch.Generator().manual_seed(config.seed)
    forward = compiled_forward(model) if compile_model else model
    union = config.schedule == "union"
    history = []
    for epoch in tqdm(range(config.epochs), desc="q-mul", disable=not progress, leave=False):
        labels_changed = None
        if relabel:  # before the norms, which measure the forget loss on these labels
            previous = forget_labels
            forget_labels = forget_similar_labels(model, forget, config, device, train_mode=True)
            labels_changed = int((forget_labels != previous).sum())
        forget_targets = Split(forget.x, forget_labels, forget.augment)
        lr = optimizer.param_groups[0]["lr"]
        norm_args = {"device": device, "batch_size": config.batch_size,
                     "max_batches": config.grad_norm_batches, "seed": config.seed + epoch,
                     "bf16": bf16, "norm": config.grad_norm}
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
            # One forward pass over whatever the step holds: BatchNorm sees the mixed batch.
            # Each loss is a mean over its own samples; in the union, per-sample weights over the
            # whole batch: sum(w_i * ce_i) / batch size.
            with bf16_autocast(device, bf16):
                logits = forward(torch.cat([x for _, _, x, _ in parts])).float()
            batch = sum(len(x) for _, _, x, _ in parts)
            loss, start = 0.0, 0
            for name, weight, x, y in parts:
                part_sum = F.cross_entropy(logits[start : start + len(x)], y, reduction="sum")
                part_loss = part_sum / len(x)
                loss = loss + weight * (part_sum / batch if union else part_loss)
                start += len(x)
                sums[name] += part_loss.item()
                counts[name] += 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] += loss.item()
            counts["loss"] += 1
        if scheduler is not None:
            scheduler.step()
        history.append({
            "epoch": epoch, "lr": lr, "w_f": w_f, "w_r": w_r, "G_f": forget_norm,
            "G_r": retain_norm, "steps": len(steps), "retain_samples": len(retain),
            **({"labels_changed": labels_changed} if relabel else {}),
            **{name: sums[name] / max(counts[name], 1) for name in sums},
        })
    return UnlearnResult(model, history)


def forget_similar_labels(
    model: nn.Module, forget: Split, config: QMulConfig, device: str | torch.device,
    train_mode: bool,
) -> torch.Tensor:
    """The forget set's similar labels from model's outputs now, with config's distance and index.

    train_mode: run the model in train mode (the public code's per-epoch labels: batch statistics,
    and BatchNorm's running statistics move), in batches of config.batch_size in the set's order;
    otherwise in eval mode. The model's train/eval mode is restored."""
    with torch.no_grad():
        if train_mode:
            was_training = model.training
            model.train()
            logits = torch.cat([model(chunk.to(device)).float().cpu()
                                for chunk in forget.x.split(config.batch_size)])
            model.train(was_training)
        else:
            logits = predict_logits(model, forget.x, device)
    return similar_labels(
        F.softmax(logits, dim=1), forget.y.cpu(),
        logits if config.label_distance == "logit" else None,
        map_index=config.label_index == "mapped",
    ).to(forget.y.device)
