"""Train the initial quantized model, register its samples and subjects, and deploy it.

A model bootstrapped on a data set whose samples were already asked to be erased trains without
them: its original version excludes them, and the record says it never learned them
(service.requests.holdings).
"""

import hashlib
import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import func, insert, select

from service.audit.lineage import quantization_lineage
from service.core.audit_log import append_audit
from service.core.db import get_engine, transaction
from service.core.migrate import upgrade_database
from service.core.models import (
    Dataset,
    ForgetRequestSample,
    ForgottenSample,
    Model,
    ModelVersion,
    Sample,
    Subject,
    VersionKind,
    utcnow,
)
from service.core.settings import Settings
from service.requests.holdings import erased_indices
from workers import engine as qf
from workers.runtime import artifact_spec, configure_torch, load_data

log = logging.getLogger(__name__)


def assign_subjects(sample_count: int, samples_per_subject: int, seed: int = 0) -> list[str]:
    """Give each training sample an owner: a seeded shuffle cut into subjects of equal size.

    The bundled data sets carry no owners; a real deployment registers its own id-to-subject map.
    """
    order = np.random.default_rng(seed).permutation(sample_count)
    owners = [""] * sample_count
    for position, dataset_index in enumerate(order):
        owners[dataset_index] = f"subject-{position // samples_per_subject + 1:04d}"
    return owners


def bootstrap(
    settings: Settings,
    model_name: str,
    spec: qf.ModelSpec,
    samples_per_subject: int = 10,
    progress: bool = True,
    float_checkpoint: Path | None = None,
) -> int:
    """Make `model_name` exist with a deployed original version. Returns the deployed version id.

    float_checkpoint: a state dict of spec's full-precision twin (spec.full_precision()), already
    trained: spec.ptq quantizes it instead of a full-precision model trained here. Its training is
    outside the service's record, so samples asked to be erased cannot be left out of it: refused then.
    """
    if float_checkpoint is not None and spec.ptq is None:
        raise ValueError("a full-precision checkpoint needs a post-training quantization recipe (spec.ptq)")
    upgrade_database(settings.database_url)
    engine = get_engine(settings, "cli")
    with transaction(engine) as session:
        existing = session.get(Model, model_name)
        if existing is not None and existing.deployed_version_id is not None:
            log.info("model %s already deployed (version %s)", model_name, existing.deployed_version_id)
            return existing.deployed_version_id

        # Erasure asked (by any request, whatever its state): never to be learned by a new model.
        erased = session.execute(
            select(Sample.id, Sample.dataset_index).where(
                Sample.dataset == spec.dataset,
                Sample.id.in_(select(ForgetRequestSample.sample_id)),
            ).order_by(Sample.id)
        ).all()
        tombstoned = erased_indices(session, spec.dataset)

    configure_torch(settings)
    data = load_data(spec, tombstoned)
    left_out = {index for _, index in erased}
    kept = [i for i in range(len(data.train)) if i not in left_out]
    if left_out and float_checkpoint is not None:
        raise ValueError(f"{len(left_out)} samples of {spec.dataset} were asked to be erased: a checkpoint trained "
                         "outside the service may hold them; bootstrap without --float-checkpoint")
    if left_out:
        log.info("bootstrap %s: %d samples whose erasure was asked are left out", model_name, len(left_out))
        data = replace(data, train=data.train.subset(kept))
    if spec.spm is not None:  # its datastore records each sample's dataset index
        network = qf.train_spm(spec.build(), data.train, kept, spec.train, settings.torch_device, progress)
    elif float_checkpoint is not None:
        float_model = spec.full_precision().build()
        float_model.load_state_dict(torch.load(float_checkpoint, map_location="cpu", weights_only=True))
        network = qf.quantize_trained(spec, float_model, data.train, settings.torch_device, progress)
    else:
        network = qf.train_original(spec, data, device=settings.torch_device, progress=progress)
    metrics = {
        "train_accuracy": qf.accuracy(network, data.train, settings.torch_device),
        "TA": qf.accuracy(network, data.test, settings.torch_device),
    }
    path, sha256 = qf.save_artifact(network, artifact_spec(spec), Path(settings.model_store))

    lineage = quantization_lineage(spec.to_dict())
    if float_checkpoint is not None:
        lineage["float_checkpoint_sha256"] = hashlib.sha256(Path(float_checkpoint).read_bytes()).hexdigest()
    train_size = len(data.train) + len(left_out)
    with transaction(engine) as session:
        _record_dataset(session, spec.dataset, train_size)
        already_registered = session.scalar(
            select(func.count()).select_from(Sample).where(Sample.dataset == spec.dataset)
        )
        if not already_registered:
            _register_samples(session, spec.dataset, train_size, samples_per_subject)
        model = Model(name=model_name, dataset=spec.dataset, spec=spec.to_dict(), semi_parametric=spec.spm is not None)
        session.add(model)
        session.flush()
        version = ModelVersion(
            model_name=model_name, kind=VersionKind.original,
            method="qat" if spec.ptq is None else f"ptq-{spec.ptq['method']}", config=spec.to_dict(),
            metrics=metrics, sha256=sha256, artifact_path=str(path),
            excluded_sample_ids=[sample_id for sample_id, _ in erased],
        )
        session.add(version)
        session.flush()
        if erased:
            session.execute(insert(ForgottenSample), [
                {"model_name": model_name, "sample_id": sample_id, "forgotten_at": utcnow(), "version_id": version.id}
                for sample_id, _ in erased
            ])
        model.deployed_version_id = version.id
        append_audit(session, actor="cli:bootstrap", action="model.deployed", object_type="model_version",
                     object_id=str(version.id),
                     details={"model": model_name, "kind": "original", "sha256": sha256, "metrics": metrics,
                              "quantization": lineage})
        return version.id


def _record_dataset(session, dataset: str, train_size: int) -> None:
    """The data set's training-split size, recorded by its first model; every later one must agree
    (a sample's dataset_index must mean the same example to every model on the data set)."""
    recorded = session.get(Dataset, dataset)
    if recorded is None:
        session.add(Dataset(name=dataset, train_size=train_size))
    elif recorded.train_size != train_size:
        raise ValueError(f"data set {dataset!r} has {recorded.train_size} training samples on record, but this "
                         f"model's data options give {train_size}: its dataset indexes would name other samples")


def _register_samples(session, dataset: str, sample_count: int, samples_per_subject: int) -> None:
    owners = assign_subjects(sample_count, samples_per_subject)
    subjects = sorted(set(owners))
    session.execute(insert(Subject), [{"id": subject} for subject in subjects])
    session.execute(
        insert(Sample),
        [{"dataset": dataset, "dataset_index": index, "subject_id": owner} for index, owner in enumerate(owners)],
    )
    append_audit(session, actor="cli:bootstrap", action="samples.registered", object_type="dataset",
                 object_id=dataset, details={"samples": sample_count, "subjects": len(subjects)})


# The architectures a model can be bootstrapped with on the bundled digits, each with its training
# recipe (LSQ+ 4-bit weights and activations for all). The ViT trains with AdamW: SGD leaves it near
# 25% train accuracy (TrainConfig.optimizer); 40 epochs at lr 3e-3 reached 92% train and 89% test
# accuracy on one thread (docs/engine.md, Models).
BOOTSTRAP_RECIPES = {
    "digits-cnn": qf.TrainConfig(),
    "digits-vit": qf.TrainConfig(epochs=40, optimizer="adamw", lr=3e-3, weight_decay=0.05),
}


def default_spec(epochs: int | None = None, architecture: str = "digits-cnn",
                 semi_parametric: bool = False, ptq: dict | None = None) -> qf.ModelSpec:
    """The recipe for a model of this architecture on the digits (BOOTSTRAP_RECIPES); by default the
    engine's digits CNN. semi_parametric: an SPM whose encoder is that architecture, with the
    engine's default SPM options (its erasures take effect at once: workers/instant.py). ptq
    (engine.PTQRecipe as a dict): trained in full precision, then quantized after training."""
    if architecture not in BOOTSTRAP_RECIPES:
        raise ValueError(f"cannot bootstrap {architecture!r}; known: {sorted(BOOTSTRAP_RECIPES)}")
    spec = qf.ModelSpec(architecture=architecture, train=BOOTSTRAP_RECIPES[architecture],
                        spm=asdict(qf.SPMOptions()) if semi_parametric else None, ptq=ptq)
    if epochs:
        spec = replace(spec, train=replace(spec.train, epochs=epochs))
    return spec
