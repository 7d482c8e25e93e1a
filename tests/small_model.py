"""A small, untrained 2-D model exported as a real artifact (seconds, no training): for tests of the ONNX runtime
and the node's device report, where what the network predicts does not matter."""

from __future__ import annotations

from pathlib import Path

import torch

from radfed.federation.learning.export import export_artifact
from radfed.federation.learning.networks import build_network
from radfed.inference.model.artifact import ModelArtifact
from radfed.inference.model.plan import Architecture, Normalization, PlanOverrides, derive_plan
from radfed.inference.model.taskspec import TaskSpec, load_task_spec
from radfed.inference.pipeline.findings import ModelIdentity


def small_spec(context_slices: int = 0) -> TaskSpec:
    """The shipped task planned as a tiny 2-D DynUNet (32 x 32 patches at batch 2, filters 8-16-32): for tests
    that train or predict for real in seconds."""
    shipped = load_task_spec()
    overrides = PlanOverrides(
        {c.name: c.modality for c in shipped.channels},
        spacing_mm=(3.0, 1.0, 1.0),
        patch_size=(1, 32, 32),
        spatial_dims=2,
        batch_size=2,
        normalization=Normalization.ZSCORE,
        filters=(8, 16, 32),
        context_slices=context_slices,
    )
    return shipped.planned(derive_plan(overrides, None))


def small_artifact(folder: Path, *, fp16: bool = False, seed: int = 0) -> ModelArtifact:
    spec = load_task_spec()
    overrides = PlanOverrides(
        {c.name: c.modality for c in spec.channels},
        spacing_mm=(3.0, 1.0, 1.0),
        patch_size=(1, 32, 32),
        spatial_dims=2,
        normalization=Normalization.ZSCORE,
        architecture=Architecture.DYNUNET,
    )
    spec = spec.planned(derive_plan(overrides, None))
    assert spec.plan is not None
    torch.manual_seed(seed)
    model = build_network(spec.plan.network, len(spec.channels))
    return export_artifact(model, spec, folder, ModelIdentity("small", "0.0.1"), fp16=fp16)
