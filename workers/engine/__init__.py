"""The unlearning engine: quantized models, data, QAT, Q-MUL, metrics and artifacts.

Depends only on torch, numpy, scikit-learn and tqdm, so it runs without the service.
"""

from .artifacts import load_artifact, save_artifact
from .data import DATASETS, DatasetSplits, Split, load_dataset
from .metrics import evaluate, gaps, mia_efficacy
from .models import MODELS, DigitsCNN, build_model
from .quantization import QUANTIZERS, LsqPlusQuantizer, QuantConv2d, QuantLinear, quantize_model
from .recipes import ModelSpec, retrain_reference, train_original
from .training import TrainConfig, accuracy, predict_probs, train_model
from .unlearning import (
    QMulConfig,
    UnlearnResult,
    expected_grad_norm,
    gradient_reweighting,
    qmul_unlearn,
    similar_labels,
)

__all__ = [
    "DATASETS", "MODELS", "QUANTIZERS",
    "DatasetSplits", "DigitsCNN", "LsqPlusQuantizer", "ModelSpec", "QMulConfig", "QuantConv2d",
    "QuantLinear", "Split", "TrainConfig", "UnlearnResult",
    "accuracy", "build_model", "evaluate", "expected_grad_norm", "gaps", "gradient_reweighting",
    "load_artifact", "load_dataset", "mia_efficacy", "predict_probs", "qmul_unlearn",
    "quantize_model", "retrain_reference", "save_artifact", "similar_labels", "train_model",
    "train_original",
]
