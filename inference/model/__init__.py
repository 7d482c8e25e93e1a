"""The model and its contract: task specs (and the shipped tasks), the plan and recipe, artifacts, the registry, the
ONNX runtime and its device."""
