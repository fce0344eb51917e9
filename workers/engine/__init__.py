"""The unlearning engine: quantized models, data, QAT, Q-MUL, metrics and artifacts.

Depends only on torch, torchvision, numpy, scikit-learn and tqdm, so it runs without the service.
"""

from .artifacts import load_artifact, save_artifact
from .data import (
    DATASETS,
    CropFlip,
    DatasetSplits,
    Split,
    classwise_forget_split,
    load_dataset,
    random_forget_split,
)
from .export import export_integer, integer_model, load_integer_model, save_integer_artifact
from .methods import (
    UNLEARNING_METHODS,
    FTConfig,
    GAConfig,
    IUConfig,
    L1SparseConfig,
    LetheViTConfig,
    OEUConfig,
    QMulNoAGRConfig,
    QMulNoSLConfig,
    QuailConfig,
    RetrainConfig,
    RLConfig,
    SalUnConfig,
    method_config,
    unlearn,
)
from .metrics import (
    evaluate,
    evaluate_with_membership,
    export_fidelity,
    gaps,
    membership_auc,
    mia_efficacy,
)
from .models import MODELS, VISION_TRANSFORMERS, CifarCNN, DigitsCNN, VisionTransformer, build_model
from .quantization import (
    QUANTIZERS,
    DoReFaWeightQuantizer,
    DsqQuantizer,
    FakeQuantizer,
    LsqPlusQuantizer,
    PactQuantizer,
    QuantConv2d,
    QuantLinear,
    quantize_model,
)
from .recipes import ModelSpec, PTQRecipe, quantize_trained, retrain_reference, train_original
from .spm import SemiParametricClassifier, SPMOptions, build_datastore, train_spm
from .training import TrainConfig, accuracy, predict_probs, train_model
from .unlearning import (
    QMulConfig,
    QMulPublicConfig,
    UnlearnResult,
    expected_grad_norm,
    gradient_reweighting,
    qmul_unlearn,
    similar_labels,
)

__all__ = [
    "DATASETS", "MODELS", "QUANTIZERS", "VISION_TRANSFORMERS", "VisionTransformer",
    "DatasetSplits", "DigitsCNN", "LsqPlusQuantizer", "ModelSpec", "QMulConfig", "QMulPublicConfig",
    "QuantConv2d",
    "QuantLinear", "Split", "TrainConfig", "UnlearnResult",
    "accuracy", "build_model", "evaluate", "expected_grad_norm", "gaps", "gradient_reweighting",
    "load_artifact", "load_dataset", "mia_efficacy", "predict_probs", "qmul_unlearn",
    "quantize_model", "retrain_reference", "save_artifact", "similar_labels", "train_model",
    "train_original", "PTQRecipe", "quantize_trained",
    # quantizers, models, data and export
    "CifarCNN", "CropFlip", "DoReFaWeightQuantizer", "DsqQuantizer", "FakeQuantizer",
    "PactQuantizer", "classwise_forget_split", "export_integer", "integer_model",
    "load_integer_model", "random_forget_split", "save_integer_artifact",
    # unlearning methods and metrics
    "UNLEARNING_METHODS", "FTConfig", "GAConfig", "IUConfig", "L1SparseConfig", "LetheViTConfig", "OEUConfig",
    "QMulNoAGRConfig", "QMulNoSLConfig", "QuailConfig", "RLConfig", "RetrainConfig", "SalUnConfig",
    "evaluate_with_membership", "export_fidelity", "membership_auc", "method_config", "unlearn",
    # semi-parametric models
    "SPMOptions", "SemiParametricClassifier", "build_datastore", "train_spm",
]
