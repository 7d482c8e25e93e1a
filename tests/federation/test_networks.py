"""The model family: every network, 2-D and 3-D, honours the contract, exports to ONNX with torch parity,
carries deep supervision in training only, and is DP-SGD compatible."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from radfed.federation.learning.export import PARITY_TOLERANCE, export_onnx, parity_error
from radfed.federation.learning.networks import TrainableScope, build_network, scope_parameters, trainable_only
from radfed.inference.model.plan import Architecture, Normalization, PlanOverrides, derive_plan
from radfed.inference.model.taskspec import TaskSpec, load_task_spec

CASES = [
    (Architecture.DYNUNET, 2),
    (Architecture.DYNUNET, 3),
    (Architecture.SEGRESNET, 2),
    (Architecture.SEGRESNET, 3),
    (Architecture.UNET, 2),
    (Architecture.UNET, 3),
    (Architecture.UNET3D, 3),
]


def _spec(architecture: Architecture, dims: int) -> TaskSpec:
    spec = load_task_spec()
    patch = (1, 64, 64) if dims == 2 else (8, 32, 32)
    overrides = PlanOverrides(
        {c.name: c.modality for c in spec.channels},
        spacing_mm=(3.0, 1.0, 1.0),
        patch_size=patch,
        spatial_dims=dims,
        normalization=Normalization.ZSCORE,
        architecture=architecture,
        filters=(8, 16, 32) if architecture is Architecture.UNET3D else None,
        norm="group" if architecture is Architecture.UNET3D else "instance",
        groups=4,
    )
    return spec.planned(derive_plan(overrides, None))


@pytest.mark.parametrize(("architecture", "dims"), CASES)
def test_every_network_exports_with_onnx_parity(tmp_path: Path, architecture: Architecture, dims: int) -> None:
    spec = _spec(architecture, dims)
    assert spec.plan is not None
    torch.manual_seed(0)
    model = build_network(spec.plan.network, len(spec.channels))
    model.eval()
    x = torch.randn(2, len(spec.channels), *spec.patch_size)
    with torch.no_grad():
        seg, cls = model(x)
    assert seg.shape == (2, 1, *spec.patch_size) and cls.shape == (2, 1)
    export_onnx(model, spec, tmp_path / "model.onnx")
    assert parity_error(model, spec, tmp_path / "model.onnx") < PARITY_TOLERANCE


def test_residual_dynunet_has_residual_blocks_and_exports_with_onnx_parity(tmp_path: Path) -> None:
    from monai.networks.blocks.dynunet_block import UnetResBlock

    spec = _spec(Architecture.DYNUNET, 2)
    assert spec.plan is not None
    plain = build_network(spec.plan.network, len(spec.channels))
    residual_plan = replace(spec.plan, network=replace(spec.plan.network, residual=True))
    spec = replace(spec, plan=residual_plan)
    torch.manual_seed(0)
    model = build_network(residual_plan.network, len(spec.channels))
    blocks = [m for m in model.modules() if isinstance(m, UnetResBlock)]
    assert blocks and not any(isinstance(m, UnetResBlock) for m in plain.modules())
    assert len(blocks) == len(residual_plan.network.strides)  # the input block, each downsampling stage, the bottleneck
    model.eval()
    export_onnx(model, spec, tmp_path / "model.onnx")
    assert parity_error(model, spec, tmp_path / "model.onnx") < PARITY_TOLERANCE


def test_deep_supervision_outputs_only_in_training() -> None:
    spec = _spec(Architecture.DYNUNET, 2)
    assert spec.plan is not None and spec.plan.network.deep_supervision == 2
    model = build_network(spec.plan.network, 3)
    x = torch.randn(2, 3, *spec.patch_size)
    model.train()
    outputs = model(x)
    assert len(outputs) == 4  # segmentation, classification, two coarser segmentations
    assert outputs[2].shape[-1] == spec.patch_size[-1] // 2 and outputs[3].shape[-1] == spec.patch_size[-1] // 4
    model.eval()
    assert len(model(x)) == 2


def test_each_tensor_is_held_once() -> None:
    """DynUNet's own skip layers reference its blocks again; radfed drops them so a site sends each once."""
    spec = _spec(Architecture.DYNUNET, 3)
    assert spec.plan is not None
    model = build_network(spec.plan.network, 3)
    pointers = [t.data_ptr() for t in model.state_dict().values()]
    assert len(pointers) == len(set(pointers))


@pytest.mark.parametrize(("architecture", "dims"), [(Architecture.DYNUNET, 2), (Architecture.SEGRESNET, 3)])
def test_networks_are_dp_compatible(architecture: Architecture, dims: int) -> None:
    from opacus.validators import ModuleValidator

    spec = _spec(architecture, dims)
    assert spec.plan is not None
    assert ModuleValidator.validate(build_network(spec.plan.network, 3), strict=False) == []


@pytest.mark.parametrize(("architecture", "dims"), CASES)
def test_the_norms_scope_is_a_small_share_with_every_norm_and_output_layer(
    architecture: Architecture, dims: int
) -> None:
    spec = _spec(architecture, dims)
    assert spec.plan is not None
    model = build_network(spec.plan.network, 3)
    every = list(model.parameters())
    assert [id(p) for p in scope_parameters(model, TrainableScope.ALL)] == [id(p) for p in every]
    chosen = {id(p) for p in scope_parameters(model, TrainableScope.NORMS)}
    norms = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.InstanceNorm2d | torch.nn.InstanceNorm3d | torch.nn.GroupNorm)
    ]
    assert norms
    assert all(id(p) in chosen for m in norms for p in m.parameters())
    # the classification head's last layer (one logit) is in the scope
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1]
    assert len(heads) == 1 and id(heads[0].weight) in chosen
    # no 3x3 convolution kernel is
    kernels = [
        m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d) and max(m.kernel_size) > 1
    ]
    assert kernels and not any(id(k) in chosen for k in kernels)
    share = sum(every[i].numel() for i in range(len(every)) if id(every[i]) in chosen) / sum(p.numel() for p in every)
    assert 0 < share < 0.05


def test_trainable_only_freezes_the_rest_within_the_block_only() -> None:
    spec = _spec(Architecture.DYNUNET, 2)
    assert spec.plan is not None
    model = build_network(spec.plan.network, 3)
    with trainable_only(model, TrainableScope.NORMS) as trained:
        assert {id(p) for p in trained} == {id(p) for p in model.parameters() if p.requires_grad}
        assert len(trained) < len(list(model.parameters()))
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match="inside"), trainable_only(model, TrainableScope.NORMS):
        raise RuntimeError("inside")
    assert all(p.requires_grad for p in model.parameters())
