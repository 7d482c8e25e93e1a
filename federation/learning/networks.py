"""The model family: MONAI's DynUNet (nnU-Net's topology), SegResNet and UNet in 2-D or 3-D, and radfed's
first compact 3-D U-Net, each behind one contract.

Every network takes ``(N, C, D, H, W)`` and returns the segmentation logits ``(N, 1, D, H, W)`` and one
study-level classification logit per input ``(N, 1)`` from a head on the bottleneck (mean and max pooled).
A 2-D network sees patches of one slice (D = 1), so sliding windows, export and the node's runtime stay the
same for both. In training mode a network with deep supervision also returns its lower-resolution
segmentation logits (third element, coarse to fine). Norms are instance or group norm: DP-SGD forbids
batch norm.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from radfed.federation.learning.unet3d import UNet3D
from radfed.inference.model.plan import Architecture, NetworkPlan


def _norm(plan: NetworkPlan) -> tuple[str, dict[str, Any]]:
    if plan.norm == "group":
        return ("GROUP", {"num_groups": plan.groups})
    return ("INSTANCE", {"affine": True})


def _per_dims(values: tuple[tuple[int, int, int], ...], dims: int) -> list[list[int]]:
    return [list(v) if dims == 3 else list(v[1:]) for v in values]


class _Head(nn.Module):
    """Classification logit from the bottleneck's mean- and max-pooled features."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * features, 1)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        flat = bottleneck.flatten(2)
        return self.linear(torch.cat([flat.mean(dim=2), flat.amax(dim=2)], dim=1))


class _DynUNet(nn.Module):
    """MONAI's DynUNet blocks, run stage by stage so that the bottleneck feeds the classification head and
    the deep-supervision heads see the decoder's outputs."""

    def __init__(self, plan: NetworkPlan, in_channels: int) -> None:
        super().__init__()
        from monai.networks.nets import DynUNet

        dims = plan.spatial_dims
        strides = _per_dims(plan.strides, dims)
        deep = plan.deep_supervision > 0
        net = DynUNet(
            spatial_dims=dims,
            in_channels=in_channels,
            out_channels=1,
            kernel_size=_per_dims(plan.kernel_sizes, dims),
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=list(plan.filters),
            norm_name=_norm(plan),
            deep_supervision=deep,
            deep_supr_num=max(1, plan.deep_supervision),
            res_block=plan.residual,
        )
        # DynUNet's own recursive skip layers reference the same blocks: drop them so each tensor is held
        # (and sent to the coordinator) once.
        del net.skip_layers
        self.net = net
        self.deep = plan.deep_supervision
        self.head = _Head(plan.filters[-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        net = self.net
        skips = [net.input_block(x)]
        for down in net.downsamples:
            skips.append(down(skips[-1]))
        bottleneck = net.bottleneck(skips[-1])
        decoded = bottleneck
        outputs = []
        for up, skip in zip(net.upsamples, reversed(skips), strict=True):
            decoded = up(decoded, skip)
            outputs.append(decoded)
        segmentation = net.output_block(decoded)
        classification = self.head(bottleneck)
        if self.training and self.deep:
            # Heads 0, 1, ... sit one, two, ... stages below full resolution.
            aux = [net.deep_supervision_heads[i](outputs[-2 - i]) for i in range(self.deep)]
            return segmentation, classification, *aux
        return segmentation, classification


class _SegResNet(nn.Module):
    def __init__(self, plan: NetworkPlan, in_channels: int) -> None:
        super().__init__()
        from monai.networks.nets import SegResNet

        stages = len(plan.strides)
        blocks = tuple([1, 2, 2, 4, 4, 4, 4][:stages])
        self.net = SegResNet(
            spatial_dims=plan.spatial_dims,
            init_filters=plan.filters[0],
            in_channels=in_channels,
            out_channels=1,
            blocks_down=blocks,
            blocks_up=tuple([1] * (stages - 1)),
            norm=_norm(plan),
        )
        self.head = _Head(plan.filters[0] * 2 ** (stages - 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bottleneck, skips = self.net.encode(x)
        skips.reverse()
        return self.net.decode(bottleneck, skips), self.head(bottleneck)


class _UNet(nn.Module):
    """MONAI's UNet (residual units); its bottom layer's output is caught on the way for the head."""

    def __init__(self, plan: NetworkPlan, in_channels: int) -> None:
        super().__init__()
        from monai.networks.layers.simplelayers import SkipConnection
        from monai.networks.nets import UNet

        dims = plan.spatial_dims
        self.net = UNet(
            spatial_dims=dims,
            in_channels=in_channels,
            out_channels=1,
            channels=plan.filters,
            strides=[list(s) if dims == 3 else list(s[1:]) for s in plan.strides[1:]],  # type: ignore[misc]
            kernel_size=3,
            up_kernel_size=3,
            num_res_units=2,
            norm=_norm(plan),
        )
        layer: nn.Module = self.net.model
        while isinstance(layer, nn.Sequential) and isinstance(layer[1], SkipConnection):
            layer = layer[1].submodule
        self._bottom: list[torch.Tensor] = []
        layer.register_forward_hook(lambda _m, _i, out: self._bottom.append(out))
        self.head = _Head(plan.filters[-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._bottom.clear()
        segmentation = self.net(x)
        return segmentation, self.head(self._bottom[-1])


class _Slices(nn.Module):
    """A 2-D network over (N, C, 1, H, W) inputs: the volume contract with a one-slice patch."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.inner(x[:, :, 0])
        return tuple(o.unsqueeze(2) if o.dim() == 4 else o for o in outputs)


class Ensemble(nn.Module):
    """Networks of one plan whose probabilities are averaged (nnU-Net averages its fold models' softmax), behind
    the same two-output contract: each output is the logit of the members' mean probability, so thresholds,
    temperature and the node's runtime read it as one network's. Members are trained apart (``fit``), never
    through this module."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [member(x) for member in self.members]
        segmentation, classification = (_mean_probability_logit([o[index] for o in outputs]) for index in range(2))
        return segmentation, classification


def _mean_probability_logit(logits: list[torch.Tensor]) -> torch.Tensor:
    # clamped so that a probability of 0 or 1 in float32 stays a finite logit (about +-16)
    mean = torch.stack([torch.sigmoid(t) for t in logits]).mean(dim=0).clamp(1e-7, 1 - 1e-7)
    return torch.log(mean) - torch.log(1 - mean)


class TrainableScope(StrEnum):
    """Which parameters a training run updates (the rest stay as the round's model sent them)."""

    ALL = "all"
    # Normalisation scales and shifts, every bias, and the layers that produce the outputs (1x1 convolutions to the
    # lesion channel, the classification head): 0.1-0.2 % of a DynUNet's weights (3.6 k of 1.9 M in the synthetic
    # tasks' 5-stage plan). Under DP-SGD the clipped per-study gradient is spread over these few coordinates while
    # the noise per coordinate stays the same.
    NORMS = "norms"


_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm)


def _output_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return module.out_features == 1
    if isinstance(module, nn.Conv2d | nn.Conv3d):
        return module.out_channels == 1 and all(k == 1 for k in module.kernel_size)
    return False


def scope_parameters(model: nn.Module, scope: TrainableScope) -> list[nn.Parameter]:
    """The parameters ``scope`` trains, each once."""
    if scope is TrainableScope.ALL:
        return list(model.parameters())
    chosen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        whole = isinstance(module, _NORMS) or _output_layer(module)
        for name, parameter in module.named_parameters(recurse=False):
            if whole or name == "bias":
                chosen[id(parameter)] = parameter
    return list(chosen.values())


@contextmanager
def trainable_only(model: nn.Module, scope: TrainableScope) -> Iterator[list[nn.Parameter]]:
    """Within the block only ``scope``'s parameters take gradients; afterwards every parameter does again."""
    trained = {id(p) for p in scope_parameters(model, scope)}
    frozen = [p for p in model.parameters() if id(p) not in trained and p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        yield [p for p in model.parameters() if id(p) in trained]
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


def build_network(plan: NetworkPlan, in_channels: int) -> nn.Module:
    """The network a plan names, behind radfed's two-output contract."""
    if plan.architecture is Architecture.UNET3D:
        if plan.spatial_dims != 3:
            raise ValueError("unet3d is 3-D only")
        return UNet3D(in_channels, plan.filters, plan.groups)
    builders = {Architecture.DYNUNET: _DynUNet, Architecture.SEGRESNET: _SegResNet, Architecture.UNET: _UNet}
    network: nn.Module = builders[plan.architecture](plan, in_channels)
    for module in network.modules():
        # MONAI's activations work in place; Opacus' per-sample hooks forbid that on their outputs.
        if getattr(module, "inplace", False):
            module.inplace = False  # type: ignore[assignment]
    return _Slices(network) if plan.spatial_dims == 2 else network
