"""Semi-parametric models (SPM): a classifier whose predictions read a store of training samples.

After Zheng, Tai and Yeh, "Designing to Forget: Deep Semi-parametric Models for Unlearning"
(CVPR 2026). A quantized encoder maps an image to an embedding; the prediction is made by a fusion
module from the query's embedding and the embeddings and labels of its k nearest training samples
in the datastore. Deleting a sample from the datastore removes its direct influence on every
prediction at once, without touching a parameter; the encoder, which still saw the sample in
training, is unlearned later like any model.

The fusion module is the paper's: experts that each attend from the query over the supports
(scaled dot product of a linear map of the query and a linear map of each support, softmax over
the supports) and return the attention mass per class label, mixed by a gate (a linear layer on the
query and the supports' mean, softmax over the experts). The output is the log of the mixture,
trained with the negative log-likelihood. Training is the paper's episodes: a batch of queries
against a support set drawn at random from the training samples. At inference each query attends
over its own k nearest neighbours in the datastore.

Choices of this engine where the paper is silent or different: the encoder is one of MODELS with
its classifier emitting the embedding (quantized like any model); the datastore keeps embeddings
as int8 with one scale per row (what an edge device downloads), and each row's dataset index, so
that a removal by index is exact; the neighbours are found by L2 distance with torch's top-k (the
paper uses faiss IndexFlatL2, the same exact search); k is 32 and the training support 100 samples
unless set (the paper evaluates with k = 1024 on CIFAR-10's 50,000 samples); the training
supports are attended over one by one, as the neighbours are at inference, where the paper's code
averages them per class first (on the digits, 15 epochs: 96% test accuracy attending over each
support, 80% with class means in training and at inference, 88% with means in training only).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import Split
from .training import TrainConfig, shuffled_batches

# The smallest probability the log of the mixture sees (an empty class would give log 0).
MIN_PROBABILITY = 1e-8
DATASTORE_BUFFERS = ("store_codes", "store_scales", "store_labels", "store_index")


@dataclass
class SPMOptions:
    """The SPM's own settings (ModelSpec.spm, as a dict)."""

    embed_dim: int = 64
    num_experts: int = 2
    k: int = 32  # neighbours each query attends over at inference
    support_size: int = 100  # training: supports drawn per batch of queries


class RelationExpert(nn.Module):
    """Attention of the query over its supports, summed per class: a probability per class."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.query = nn.Linear(embed_dim, embed_dim, bias=False)
        self.support = nn.Linear(embed_dim, embed_dim, bias=False)

    def forward(self, q: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor,
                present: torch.Tensor | None = None) -> torch.Tensor:
        # q: B x D, supports: B x K x D, labels: B x K, present (B x K): the supports to attend over.
        scores = torch.einsum("bd,bkd->bk", self.query(q), self.support(supports)) / math.sqrt(q.shape[1])
        if present is not None:
            scores = scores.masked_fill(~present, float("-inf"))
        weights = F.softmax(scores, dim=1)
        one_hot = F.one_hot(labels, self.num_classes).to(weights.dtype)
        return torch.einsum("bk,bkc->bc", weights, one_hot)


class SemiParametricClassifier(nn.Module):
    """Encoder, fusion module (experts and gate) and the datastore (module docstring).

    The datastore is held in buffers, so it travels in the state dict, the artifact and its sha256:
    `store_codes` (N x D int8), `store_scales` (N, one per row), `store_labels` (N) and
    `store_index` (N, each row's index in the data set's train split)."""

    def __init__(self, encoder: nn.Module, num_classes: int, options: SPMOptions):
        super().__init__()
        self.encoder = encoder
        self.num_classes = num_classes
        self.options = options
        self.experts = nn.ModuleList(RelationExpert(options.embed_dim, num_classes)
                                     for _ in range(options.num_experts))
        self.gate = nn.Linear(2 * options.embed_dim, options.num_experts)
        self.register_buffer("store_codes", torch.zeros(0, options.embed_dim, dtype=torch.int8))
        self.register_buffer("store_scales", torch.zeros(0))
        self.register_buffer("store_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("store_index", torch.zeros(0, dtype=torch.long))
        self._dequantized: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    # The datastore ------------------------------------------------------------------------------

    def datastore_size(self) -> int:
        return len(self.store_index)

    def set_datastore(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        """Replace the datastore by these embeddings (quantized to int8, one scale per row)."""
        embeddings = embeddings.detach().float().cpu()
        scales = embeddings.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        device = self.store_codes.device
        self.store_codes = torch.round(embeddings / scales[:, None]).clamp(-127, 127).to(torch.int8).to(device)
        self.store_scales = scales.to(device)
        self.store_labels = labels.detach().to(torch.long).to(device)
        self.store_index = torch.as_tensor(indices, dtype=torch.long).to(device)
        self._dequantized = None

    def remove_samples(self, indices) -> int:
        """Delete the rows of these dataset indices; returns how many rows went."""
        drop = torch.isin(self.store_index, torch.as_tensor(list(indices), dtype=torch.long,
                                                           device=self.store_index.device))
        removed = int(drop.sum())
        if removed:
            keep = ~drop
            self.store_codes, self.store_scales = self.store_codes[keep], self.store_scales[keep]
            self.store_labels, self.store_index = self.store_labels[keep], self.store_index[keep]
            self._dequantized = None
        return removed

    def store_embeddings(self) -> torch.Tensor:
        """The datastore's embeddings in float, computed once per datastore."""
        return self._store()[0]

    def _store(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The dequantized rows and their squared norms, once per datastore (not per query).
        key = (self.store_codes.data_ptr(), self.store_codes.shape, self.store_codes.device)
        if self._dequantized is None or self._dequantized[0] != key:
            store = self.store_codes.float() * self.store_scales[:, None]
            self._dequantized = (key, (store, (store * store).sum(dim=1)))
        return self._dequantized[1]

    @torch.no_grad()
    def nearest(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """Rows of the k nearest datastore embeddings (L2) of each query: B x k."""
        store, squared = self._store()
        # ||q - s||^2 = ||q||^2 - 2 q.s + ||s||^2; ||q||^2 does not change the ranking.
        distances = torch.addmm(squared[None, :], q.float(), store.T, alpha=-2.0)
        return distances.topk(min(k, len(store)), dim=1, largest=False).indices

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A datastore has as many rows as it holds samples: take the stored shapes.
        for name in DATASTORE_BUFFERS:
            if prefix + name in state_dict:
                stored = state_dict[prefix + name]
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        self._dequantized = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # Prediction --------------------------------------------------------------------------------

    def fuse(self, q: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor,
             present: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities from the query embeddings (B x D) and their supports (B x K x D, B x K;
        present, B x K: the supports that count, all when None)."""
        experts = torch.stack([expert(q, supports, labels, present) for expert in self.experts], dim=1)
        if present is None:
            context = supports.mean(dim=1)
        else:
            weights = present.to(supports.dtype)
            context = (weights[:, :, None] * supports).sum(dim=1) / weights.sum(dim=1, keepdim=True)
        gate = F.softmax(self.gate(torch.cat([q, context], dim=1)), dim=1)
        mixture = (gate[:, :, None] * experts).sum(dim=1)
        return torch.log(mixture.clamp(min=MIN_PROBABILITY))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (they serve as logits: their softmax is the mixture) from each query's
        k nearest neighbours in the datastore."""
        if self.datastore_size() == 0:
            raise RuntimeError("the SPM's datastore is empty: build it (build_datastore) before predicting")
        q = self.encoder(x)
        rows = self.nearest(q, self.options.k)
        supports = self.store_embeddings()[rows].to(q.dtype)
        return self.fuse(q, supports, self.store_labels[rows])


def train_spm(model: SemiParametricClassifier, data: Split, indices, config: TrainConfig,
              device: str | torch.device = "cpu", progress: bool = True, desc: str = "spm") -> SemiParametricClassifier:
    """The paper's episodic training, then the datastore built from `data` (whose rows are the
    samples at dataset `indices`). SGD with momentum, cosine decay and gradient clipping as
    train_model; each batch of queries is classified against `support_size` samples drawn at
    random, both augmented, through the same encoder."""
    model.to(device).train()
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(data) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    support_size = min(model.options.support_size, len(data))
    for _ in tqdm(range(config.epochs), desc=desc, disable=not progress, leave=False):
        for query_index in shuffled_batches(len(data), config.batch_size, generator):
            support_index = torch.randperm(len(data), generator=generator)[:support_size]
            x, y = data.training_batch(torch.cat([query_index, support_index]), generator, device)
            batch = len(query_index)
            embeddings = model.encoder(x)
            q, supports = embeddings[:batch], embeddings[batch:]
            log_probs = model.fuse(q, supports.expand(batch, -1, -1), y[batch:].expand(batch, -1))
            loss = F.nll_loss(log_probs, y[:batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
    return build_datastore(model, data, indices, device)


@torch.no_grad()
def build_datastore(model: SemiParametricClassifier, data: Split, indices,
                    device: str | torch.device = "cpu", batch_size: int = 512) -> SemiParametricClassifier:
    """Fill the datastore with the encoder's embeddings of `data` (rows at dataset `indices`),
    in eval mode, without augmentation; the model's train/eval mode is restored."""
    if len(indices) != len(data):
        raise ValueError(f"{len(indices)} dataset indices for {len(data)} samples")
    was_training = model.training
    model.to(device).eval()
    embeddings = [model.encoder(chunk.to(device)).cpu() for chunk in data.x.split(batch_size)]
    model.train(was_training)
    empty = torch.zeros(0, model.options.embed_dim)
    model.set_datastore(torch.cat(embeddings) if embeddings else empty, data.y, torch.as_tensor(list(indices)))
    return model
