"""How a model's weights came to be quantized, from its stored spec (ModelSpec.to_dict, whose ptq
names every choice of workers.engine.recipes.PTQRecipe): what the version's audit entry records
and the audit report states. Plain data, no engine import: the API reads it without torch."""


def quantization_lineage(spec: dict) -> dict:
    """procedure, and for post-training quantization its method and calibration source;
    `calibration_read_samples` says whether quantizing read any sample of the data set (a
    synthetic calibration reads none: its inputs are made from the full-precision model)."""
    ptq = spec.get("ptq")
    if ptq is None:
        return {"procedure": "quantization-aware training"}
    calibration = ptq["calibration"]
    lineage = {
        "procedure": "post-training quantization",
        "method": ptq["method"],
        "calibration": calibration,
        "calibration_samples": ptq["samples"],
        "calibration_read_samples": calibration == "real",
    }
    if calibration == "synthetic":
        lineage["synthesizer"] = ptq["synthesizer"]
    return lineage


def describe_quantization(spec: dict) -> str:
    """One sentence for a person."""
    lineage = quantization_lineage(spec)
    if lineage["procedure"] == "quantization-aware training":
        return "Quantized by quantization-aware training on the training split."
    source = (f"{lineage['calibration_samples']} synthetic inputs made by {lineage['synthesizer']} from the "
              "full-precision model: quantizing read no sample of the data set"
              if lineage["calibration"] == "synthetic"
              else f"{lineage['calibration_samples']} samples of the training split")
    return f"Quantized after full-precision training ({lineage['method']} post-training quantization), calibrated on {source}."
