"""Unlearning on the quantized digits ViT: every method runs on it, and LetheViT does what it says
(masks the most-attended patches, pulls the forget logits towards the masked image's)."""

import pytest
import torch
import torch.nn.functional as F

from workers.engine import ModelSpec, TrainConfig, accuracy, train_model
from workers.engine.methods import (
    UNLEARNING_METHODS,
    LetheViTConfig,
    contrastive_logit_loss,
    method_applies,
    most_attended_mask,
    unlearn,
)
from workers.engine.training import predict_logits

VIT_SPEC = ModelSpec(architecture="digits-vit",
                     train=TrainConfig(epochs=4, optimizer="adamw", lr=3e-3, weight_decay=0.05))


@pytest.fixture(scope="module")
def vit(small_train):
    """A 4-bit digits ViT trained briefly on the 400 samples; tests must not modify it."""
    return train_model(VIT_SPEC.build(), small_train, VIT_SPEC.train, progress=False)


@pytest.fixture(scope="module")
def vit_split(small_train):
    return small_train.subset(range(40)), small_train.subset(range(40, 400))


ONE_EPOCH = {"retrain": {"spec": ModelSpec(architecture="digits-vit", train=TrainConfig(epochs=1))},
             "iu": {"fisher_samples": 20}, "lethevit": {"epochs": 1, "retain_epochs": 1}}


@pytest.mark.parametrize("method", list(UNLEARNING_METHODS))
def test_every_method_runs_on_the_quantized_vit(method, vit, vit_split):
    forget, retain = vit_split
    before = {name: t.clone() for name, t in vit.state_dict().items()}
    result = unlearn(method, vit, forget, retain, ONE_EPOCH.get(method, {"epochs": 1}), progress=False)
    assert result.model is not vit and result.history
    assert all(torch.equal(before[n], t) for n, t in vit.state_dict().items())
    after = result.model.state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert torch.isfinite(predict_logits(result.model, retain.x)).all()


def test_lethevit_applies_only_to_vision_transformers(small_model, vit_split):
    assert method_applies("lethevit", "digits-vit") and method_applies("lethevit", "vit-tiny")
    assert not method_applies("lethevit", "digits-cnn") and method_applies("qmul", "digits-cnn")
    forget, retain = vit_split
    with pytest.raises(ValueError, match="vision transformer"):
        unlearn("lethevit", small_model, forget, retain, progress=False)
    with pytest.raises(ValueError, match="unknown loss"):
        unlearn("lethevit", small_model, forget, retain, {"loss": "hinge"}, progress=False)


def test_mask_hides_the_most_attended_patches(vit, vit_split):
    forget, _ = vit_split
    x = forget.x[:6]
    mask = most_attended_mask(vit, x, ratio=0.25, layer=-1)
    assert mask.shape == (6, 1, 8, 8)
    patches = mask[:, 0, ::2, ::2]  # one value per 2x2 patch; each patch is all 0 or all 1
    assert torch.equal(mask, patches.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None])
    assert (patches == 0).sum(dim=(1, 2)).tolist() == [4] * 6  # ceil(0.25 * 16) per image
    attention = vit.cls_attention(x.float(), -1)
    hidden_least = torch.where(patches == 0, attention, torch.inf).amin(dim=(1, 2))
    shown_most = torch.where(patches == 1, attention, -torch.inf).amax(dim=(1, 2))
    assert (hidden_least >= shown_most).all()  # what is hidden is what the CLS token attends to most
    assert torch.equal(most_attended_mask(vit, x, ratio=0.0), torch.ones_like(mask))
    assert vit.training  # the model's mode is restored


def test_contrastive_losses_prefer_the_positive():
    z_neg, z_pos = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0]])
    for loss in ("infonce", "triplet"):
        config = LetheViTConfig(loss=loss)
        at_negative = contrastive_logit_loss(z_neg, z_pos, z_neg, config)
        at_positive = contrastive_logit_loss(z_pos, z_pos, z_neg, config)
        assert at_positive < at_negative
    # InfoNCE of one positive and one negative: the two-way cross-entropy towards the positive.
    z = torch.tensor([[1.0, 2.0, 0.5]])
    config = LetheViTConfig(temperature=0.5)
    logits = torch.stack([F.cosine_similarity(z, z_pos), F.cosine_similarity(z, z_neg)], dim=1) / 0.5
    expected = F.cross_entropy(logits, torch.tensor([0]))
    assert torch.allclose(contrastive_logit_loss(z, z_pos, z_neg, config), expected)


def test_lethevit_moves_the_forget_logits_towards_the_masked_images(vit, vit_split):
    forget, retain = vit_split
    config = LetheViTConfig(epochs=3, retain_epochs=0)
    result = unlearn("lethevit", vit, forget, retain, config, progress=False)
    masked = forget.x * most_attended_mask(vit, forget.x, config.mask_ratio)
    positive, negative = predict_logits(vit, masked), predict_logits(vit, forget.x)
    before = F.cosine_similarity(negative, positive).mean()
    after = F.cosine_similarity(predict_logits(result.model, forget.x), positive).mean()
    assert after > before  # closer to the masked image's logits than the original model was
    assert [entry["stage"] for entry in result.history] == ["contrastive"] * 3
    assert all(0 <= entry["masked_agreement"] <= 1 for entry in result.history)

    result = unlearn("lethevit", vit, forget, retain, LetheViTConfig(epochs=1, retain_epochs=2), progress=False)
    assert [entry["stage"] for entry in result.history] == ["contrastive", "retain", "retain"]
    assert accuracy(result.model, retain) > 10
