"""The semi-parametric model: training, its datastore, exact removal by dataset index, artifacts."""

import copy

import pytest
import torch

from workers.engine import ModelSpec, TrainConfig, accuracy, load_artifact, save_artifact, train_original

SPEC = ModelSpec(spm={"embed_dim": 32, "k": 8}, train=TrainConfig(epochs=6))


@pytest.fixture(scope="module")
def spm(digits):
    return train_original(SPEC, digits, progress=False)


def test_an_spm_learns_and_holds_every_training_sample(spm, digits):
    assert spm.datastore_size() == len(digits.train)
    assert spm.store_codes.dtype == torch.int8
    assert torch.equal(spm.store_index, torch.arange(len(digits.train)))
    assert accuracy(spm, digits.test) > 85.0


def test_removal_is_exact_and_travels_in_the_artifact(spm, digits, tmp_path):
    path, sha256 = save_artifact(spm, {"model": SPEC.model_kwargs()}, tmp_path)
    model, _ = load_artifact(path, sha256)
    removed = [3, 17, 500, 1436]
    assert model.remove_samples(removed + [10**6]) == len(removed)  # an index it never held is no row
    assert model.datastore_size() == len(digits.train) - len(removed)
    assert not torch.isin(model.store_index, torch.tensor(removed)).any()
    assert model.remove_samples(removed) == 0
    kept = ~torch.isin(spm.store_index, torch.tensor(removed))
    assert torch.equal(model.store_codes, spm.store_codes[kept])  # the other rows are untouched
    new_path, new_sha256 = save_artifact(model, {"model": SPEC.model_kwargs()}, tmp_path)
    assert new_sha256 != sha256
    reloaded, _ = load_artifact(new_path, new_sha256)
    assert torch.equal(reloaded.store_index, model.store_index)
    assert torch.equal(reloaded.store_codes, model.store_codes)
    assert accuracy(reloaded, digits.test) == pytest.approx(accuracy(model, digits.test))


def test_a_removed_sample_no_longer_answers_from_itself(spm, digits):
    """A training sample is its own nearest neighbour (distance zero): removing it takes that away."""
    model = copy.deepcopy(spm).eval()
    with torch.no_grad():
        embedding = model.encoder(digits.train.subset([42]).x)
    assert model.store_index[model.nearest(embedding, 1)].item() == 42
    model.remove_samples([42])
    assert 42 not in model.store_index[model.nearest(embedding, model.options.k)].tolist()


def test_an_empty_datastore_is_refused():
    with pytest.raises(RuntimeError, match="datastore is empty"):
        SPEC.build()(torch.zeros(2, 1, 8, 8))
