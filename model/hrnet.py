"""HRNet-W48, three stages: the backbone of DistilPose-L.

Implements the high-resolution network of Sun et al., "Deep High-Resolution Representation
Learning for Human Pose Estimation" (CVPR 2019), in the truncated form DistilPose-L uses: the stem,
``layer1`` (4 bottlenecks), stage 2 (2 branches) and stage 3 (3 branches, the last module fusing
to the 48-channel branch only). Stage 4 and ``transition3`` are left out, exactly as in the
official ``HRNet_3stage``.
Written from ``distilpose-spec.md`` section 2.2; module names reproduce the official state_dict keys
(``conv1``, ``bn1``, ``layer1.{b}.downsample.{0,1}``, ``transition1.1.0.{0,1}``,
``stage3.{m}.fuse_layers.{i}.{j}...``), so official checkpoints load with ``strict=True``.

The residual blocks live here and are shared with DistilPose-S's ``StemNet`` (``model.distilpose``),
which is this network's stem plus ``layer1``. Training-only pieces (init schemes, frozen stages,
checkpointing) are not ported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# ----------------------------------------------------------------------------------------- blocks


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    """A bias-free convolution ("same" padding) and its BatchNorm, for ``nn.Sequential``."""
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with an identity shortcut (HRNet branches)."""

    expansion = 1

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class Bottleneck(nn.Module):
    """ResNet bottleneck 1x1 -> 3x3 -> 1x1 (x4 channels), projection shortcut when shapes differ."""

    expansion = 4

    def __init__(self, c_in: int, planes: int) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        # Official key names: downsample.0 (conv), downsample.1 (BN).
        self.downsample = nn.Sequential(*conv_bn(c_in, c_out, 1)) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, 4 * planes, H, W)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def make_layer1() -> nn.Sequential:
    """The 4 bottlenecks (64 -> 256 channels) that follow the stem in HRNet and StemNet."""
    return nn.Sequential(Bottleneck(64, 64), *(Bottleneck(256, 64) for _ in range(3)))


def _fuse_path(channels: Sequence[int], src: int, dst: int) -> nn.Module:
    """The path that brings branch ``src`` to the resolution and width of branch ``dst``.

    Lower resolution (src > dst): 1x1 conv + BN, then nearest upsampling by 2**(src - dst).
    Higher resolution (src < dst): (dst - src) stride-2 3x3 conv + BN; all but the last keep the
    source width and end in ReLU, the last maps to the target width without ReLU.
    """
    if src == dst:
        return nn.Identity()
    if src > dst:
        return nn.Sequential(
            *conv_bn(channels[src], channels[dst], 1),
            nn.Upsample(scale_factor=2 ** (src - dst), mode="nearest"),
        )
    steps: list[nn.Module] = []
    for step in range(dst - src):
        last = step == dst - src - 1
        c_out = channels[dst] if last else channels[src]
        layers = conv_bn(channels[src], c_out, 3, stride=2)
        steps.append(nn.Sequential(*layers) if last else nn.Sequential(*layers, nn.ReLU(True)))
    return nn.Sequential(*steps)


class FusePaths(nn.ModuleList):
    """All paths into one output branch (key ``fuse_layers.{i}.{j}``: source branch j)."""

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Sum of every branch brought to this branch's shape (branch order 0..n-1, as official)."""
        y = self[0](xs[0])
        for path, x in zip(self[1:], xs[1:], strict=True):
            y = y + path(x)
        return y


class HRModule(nn.Module):
    """Parallel branches of BasicBlocks, then a full exchange between resolutions.

    Args:
        channels: width of each branch, highest resolution first (e.g. (48, 96, 192)).
        num_blocks: BasicBlocks per branch.
        multiscale_output: return every branch; False returns only the highest-resolution one.
    """

    def __init__(
        self, channels: Sequence[int], num_blocks: int = 4, multiscale_output: bool = True
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*(BasicBlock(c) for _ in range(num_blocks))) for c in channels
        )
        n_out = len(channels) if multiscale_output else 1
        self.fuse_layers = nn.ModuleList(
            FusePaths(_fuse_path(channels, j, i) for j in range(len(channels)))
            for i in range(n_out)
        )
        self.relu = nn.ReLU(inplace=False)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """xs[i]: (B, C_i, H / 2**i, W / 2**i) -> same shapes (only xs[0]'s if not multiscale)."""
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        return [self.relu(paths(xs)) for paths in self.fuse_layers]


# ------------------------------------------------------------------------------------------ model


class HRNetW48ThreeStage(nn.Module):
    """HRNet-W48 truncated after stage 3: (B, 3, H, W) -> (B, 48, H / 4, W / 4)."""

    out_channels = 48

    def __init__(self) -> None:
        super().__init__()
        widths = (48, 96, 192)
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_layer1()
        # transition1.0: 256 -> 48 at stride 4; transition1.1.0: 256 -> 96 at stride 8.
        self.transition1 = nn.ModuleList(
            [
                nn.Sequential(*conv_bn(256, widths[0], 3), nn.ReLU(True)),
                nn.Sequential(nn.Sequential(*conv_bn(256, widths[1], 3, stride=2), nn.ReLU(True))),
            ]
        )
        self.stage2 = nn.Sequential(HRModule(widths[:2]))
        # transition2.2.0: the lowest-resolution stage-2 output (96 ch) -> 192 ch at stride 16.
        self.transition2 = nn.ModuleList(
            [
                nn.Identity(),
                nn.Identity(),
                nn.Sequential(
                    nn.Sequential(*conv_bn(widths[1], widths[2], 3, stride=2), nn.ReLU(True))
                ),
            ]
        )
        self.stage3 = nn.Sequential(
            HRModule(widths),
            HRModule(widths),
            HRModule(widths),
            HRModule(widths, multiscale_output=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> (B, 48, H / 4, W / 4)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)  # (B, 256, H/4, W/4)
        ys = self.stage2([t(x) for t in self.transition1])
        t2 = self.transition2
        ys = self.stage3([t2[0](ys[0]), t2[1](ys[1]), t2[2](ys[-1])])
        return ys[0]
