"""DistilPose students (DistilPose-S, DistilPose-L) in plain PyTorch.

Implements the inference network of Ye et al., "DistilPose: Tokenized Pose Regression with Heatmap
Distillation" (CVPR 2023, arXiv 2303.02455), written from ``distilpose-spec.md`` (no code from the
official repository, mmcv, mmpose, einops or timm):

* backbone: ``StemNet`` (DistilPose-S: stem + 4 bottlenecks, 256 ch at stride 4) or the three-stage
  HRNet-W48 of ``model.hrnet`` (DistilPose-L: 48 ch at stride 4);
* Token-distilling Encoder: 4x3 patches of the 64x48 feature map -> 256 visual tokens, 17 learnable
  keypoint tokens in front, 12 pre-norm transformer layers (8 heads of 24), a fixed 2-D sine table
  added to the visual tokens at the input and again in the residual stream before layers 1..11;
* head: LayerNorm + Linear(192 -> 5) per keypoint token: sigmoid (x, y), raw score, softplus sigma.

Module names reproduce the official state_dict keys (``backbone.*``,
``keypoint_head.tokenhead.transformer.layers.{l}.{0,1}.fn.{norm,fn}.*``), so an official checkpoint
loads with ``strict=True``. Left out: the teacher network and every training loss (the teacher is
not part of a student checkpoint and plays no part at inference), flip test and decoding (geometry
lives in ``model.crops``). Weight files and metadata: ``model.weights``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.hrnet import HRNetW48ThreeStage, make_layer1
from model.interfaces import PoseModelInfo, PoseOutput

# ----------------------------------------------------------------------------------------- blocks


class StemNet(nn.Module):
    """DistilPose-S backbone: HRNet's stem and ``layer1``, (B, 3, H, W) -> (B, 256, H/4, W/4)."""

    out_channels = 256

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_layer1()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> (B, 256, H / 4, W / 4)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.layer1(x)


def sine_position_table(
    grid_h: int, grid_w: int, dim: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The fixed 2-D sine table of the official 'sine-full' embedding, (1, grid_h * grid_w, dim).

    Row angles fill channels [0, dim/2), column angles [dim/2, dim); within each half even channels
    are sin and odd ones cos of angle / 10000**(2 * (i // 2) / (dim / 2)). Computed in float32 with
    the official operation order, so it is bit-identical to the official table. Built on CPU by
    default, even under a ``torch.device("meta")`` context (meta arange pulls in torch's slow
    decomposition machinery; the table is tiny).
    """
    half = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    rows = torch.arange(1, grid_h + 1, dtype=torch.float32, device=device)
    cols = torch.arange(1, grid_w + 1, dtype=torch.float32, device=device)
    rows = rows / (rows[-1:] + eps) * scale  # (gh,)
    cols = cols / (cols[-1:] + eps) * scale  # (gw,)
    dim_t = torch.arange(half, dtype=torch.float32, device=device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)  # (half,)

    def features(angles: torch.Tensor) -> torch.Tensor:
        a = angles[:, None] / dim_t  # (n, half)
        return torch.stack((a[:, 0::2].sin(), a[:, 1::2].cos()), dim=2).flatten(1)

    fy = features(rows)[:, None, :].expand(grid_h, grid_w, half)
    fx = features(cols)[None, :, :].expand(grid_h, grid_w, half)
    return torch.cat((fy, fx), dim=2).reshape(1, grid_h * grid_w, dim)


class Attention(nn.Module):
    """Multi-head self-attention: one bias-free q|k|v projection, output projection with bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5  # 24**-0.5 for 192 / 8
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        b, t, d = x.shape
        # (B, T, 3D) -> (3, B, heads, T, D / heads); head h uses channels h*24 .. h*24+23.
        qkv = self.to_qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, heads, T, D/heads)
        return self.to_out(out.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """Linear -> exact GELU -> Linear (keys ``net.0`` and ``net.3``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Linear(hidden, dim),
            nn.Dropout(0.0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.net(x)


class PreNormResidual(nn.Module):
    """``x + fn(LayerNorm(x))``; the nesting ``fn.norm`` / ``fn.fn`` mirrors the official keys."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = _PreNorm(dim, fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        return x + self.fn(x)


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class EncoderLayer(nn.ModuleList):
    """One pre-norm layer: attention block (key ``.0``), then feed-forward block (key ``.1``)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__(
            [
                PreNormResidual(dim, Attention(dim, heads)),
                PreNormResidual(dim, FeedForward(dim, mlp_dim)),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        for block in self:
            x = block(x)
        return x


class Transformer(nn.Module):
    """Pre-norm encoder; the position table re-enters the residual stream before layers 1..L-1.

    Args:
        num_prefix: leading tokens (the keypoint tokens) that get no positional term.
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, num_prefix: int) -> None:
        super().__init__()
        self.num_prefix = num_prefix
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, mlp_dim) for _ in range(depth))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x: (B, P + N, D) tokens, pos: (1, N, D) table of the N trailing ones -> (B, P + N, D)."""
        # Zero rows for the prefix tokens: one broadcast add instead of a sliced in-place update.
        pos_full = F.pad(pos, (0, 0, self.num_prefix, 0))  # (1, P + N, D)
        for index, layer in enumerate(self.layers):
            if index > 0:
                x = x + pos_full
            x = layer(x)
        return x


class TokenDistillingEncoder(nn.Module):
    """Patch embedding + keypoint tokens + transformer + regression head (``tokenhead``)."""

    def __init__(self, config: DistilPoseConfig) -> None:
        super().__init__()
        c = config
        self.grid = (c.feature_size[0] // c.patch_size[0], c.feature_size[1] // c.patch_size[1])
        self.patch_size = c.patch_size
        self.keypoint_token = nn.Parameter(torch.zeros(1, c.num_keypoints, c.dim))
        # A frozen parameter (not a buffer) as in the official model, so the key is in state_dict.
        self.pos_embedding = nn.Parameter(
            sine_position_table(self.grid[0], self.grid[1], c.dim), requires_grad=False
        )
        self.patch_to_embedding = nn.Linear(c.patch_dim, c.dim)
        self.transformer = Transformer(c.dim, c.depth, c.heads, c.mlp_dim, c.num_keypoints)
        self.mlp_head = nn.Sequential(nn.LayerNorm(c.dim, eps=1e-5), nn.Linear(c.dim, 5))

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feature map (B, C, Hf, Wf) -> (head output (B, K, 5), kpt tokens (B, K, D), vis tokens).

        The visual tokens are (B, gh * gw, D) in row-major patch order.
        """
        b, c, _, _ = feat.shape
        (gh, gw), (ph, pw) = self.grid, self.patch_size
        # (B, C, gh, ph, gw, pw) -> (B, gh, gw, ph, pw, C): vector order (row, col, channel).
        patches = feat.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1)
        vis = self.patch_to_embedding(patches.reshape(b, gh * gw, ph * pw * c)) + self.pos_embedding
        x = torch.cat((self.keypoint_token.expand(b, -1, -1), vis), dim=1)  # (B, K + N, D)
        x = self.transformer(x, self.pos_embedding)
        k = self.keypoint_token.shape[1]
        kpt, vis = x[:, :k], x[:, k:]
        # The head in float32 whatever autocast says: in bf16 its 5 outputs would carry 8 bits, and
        # sigmoid(x, y) would step by up to 1/256 of the crop. It is 5 x D multiply-adds per token.
        with torch.autocast(kpt.device.type, enabled=False):
            out = self.mlp_head(kpt.to(self.mlp_head[1].weight.dtype))
        return out, kpt, vis


class DistilPoseHead(nn.Module):
    """Parameter-free wrapper that only exists to give the official ``keypoint_head.`` prefix."""

    def __init__(self, config: DistilPoseConfig) -> None:
        super().__init__()
        self.tokenhead = TokenDistillingEncoder(config)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See ``TokenDistillingEncoder.forward``."""
        return self.tokenhead(feat)


# ------------------------------------------------------------------------------------------ model


@dataclass
class DistilPoseOutput:
    """Network outputs for B crops (K = 17 keypoints, D = 192).

    coords: (B, K, 2) (x, y) in [0, 1] of the crop width / height.
    scores: (B, K) raw confidence (no sigmoid, no clamp, as official).
    sigmas: (B, K, 2) softplus (sigma_x, sigma_y) in heatmap cells (1 cell = stride crop pixels).
    kpt_tokens: (B, K, D) keypoint tokens after the last layer (before the head's LayerNorm).
    vis_tokens: (B, N, D) visual tokens after the last layer (N = 256).
    """

    coords: torch.Tensor
    scores: torch.Tensor
    sigmas: torch.Tensor
    kpt_tokens: torch.Tensor
    vis_tokens: torch.Tensor


class DistilPose(nn.Module):
    """A DistilPose student: normalised RGB crops (B, 3, 256, 192) -> ``DistilPoseOutput``.

    Args:
        config: the architecture (see ``VARIANTS``).
        info: crop geometry and normalisation the weights expect (``model.weights.KNOWN_WEIGHTS``).
    """

    def __init__(self, config: DistilPoseConfig, info: PoseModelInfo) -> None:
        super().__init__()
        self.config = config
        self.info = info
        self.weights_sha256: str | None = None
        self.backbone = config.backbone()
        self.keypoint_head = DistilPoseHead(config)
        w, h = config.input_size
        # sigma (heatmap cells) -> [0, 1] crop units: * stride / W for x, * stride / H for y.
        self.sigma_to_crop = (config.stride / w, config.stride / h)

    def forward(self, x: torch.Tensor) -> DistilPoseOutput:
        """x: (B, 3, H, W) normalised RGB crops -> ``DistilPoseOutput``."""
        out, kpt, vis = self.keypoint_head(self.backbone(x))  # out: (B, K, 5), float32
        return DistilPoseOutput(
            coords=out[..., 0:2].sigmoid(),
            scores=out[..., 2],
            sigmas=F.softplus(out[..., 3:5]),
            kpt_tokens=kpt,
            vis_tokens=vis,
        )

    @torch.inference_mode()
    def predict(self, crops: torch.Tensor) -> PoseOutput:
        """Run on normalised crops (N, 3, H, W); float32 outputs, sigmas in [0, 1] crop units."""
        param = self.keypoint_head.tokenhead.keypoint_token
        out = self(crops.to(param.device, param.dtype))
        sigmas = out.sigmas.float() * out.coords.new_tensor(self.sigma_to_crop, dtype=torch.float32)
        return PoseOutput(coords=out.coords.float(), scores=out.scores.float(), sigmas=sigmas)

    def init_weights(self) -> None:
        """The official from-scratch init (tests overwrite it with recipe weights).

        The official ``trunc_normal_(std=0.02)`` truncates at +-2 absolute, i.e. at 100 sigma, so a
        plain normal draw is the same distribution (and much faster).
        """
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
            elif isinstance(m, nn.BatchNorm2d | nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and name.startswith("keypoint_head."):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.keypoint_head.tokenhead.keypoint_token, std=0.02)


# ------------------------------------------------------------------------------ checkpoint filter

# Prefixes of teacher weights that training code may leave in a student checkpoint: a wrapped
# teacher module (``teacher.``, ``teacher_model.``, ...) and the TokenPose teacher head, whose
# prefix is ``keypoint_head.tokenpose.`` (the student's is ``keypoint_head.tokenhead.``).
TEACHER_KEY_PREFIXES: tuple[str, ...] = ("keypoint_head.tokenpose.",)


def is_teacher_key(key: str) -> bool:
    """True for a key of the distillation teacher, never part of the student at inference."""
    return "teacher" in key.split(".", 1)[0] or key.startswith(TEACHER_KEY_PREFIXES)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official checkpoint layout -> this model's keys (the same names; nothing is renamed).

    Strips a ``module.`` prefix (DataParallel / DDP wrappers) and drops teacher keys (see
    ``is_teacher_key``). Everything else is kept, so the strict check afterwards still reports any
    unexpected key by name.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("module.")
        if not is_teacher_key(name):
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class DistilPoseConfig:
    """Architecture of one DistilPose student.

    Attributes:
        name: variant name, e.g. "distilpose_s".
        backbone: builds the backbone, (B, 3, H, W) -> (B, backbone_channels, H/stride, W/stride).
        backbone_channels: C of the feature map.
        input_size: crop (W, H).
        stride: backbone output stride.
        patch_size: (h, w) of a patch on the feature map.
    """

    name: str
    backbone: Callable[[], nn.Module]
    backbone_channels: int
    input_size: tuple[int, int] = (192, 256)
    stride: int = 4
    patch_size: tuple[int, int] = (4, 3)
    num_keypoints: int = 17
    dim: int = 192
    depth: int = 12
    heads: int = 8
    mlp_dim: int = 576

    @property
    def feature_size(self) -> tuple[int, int]:
        """(H, W) of the backbone output: (64, 48) for a 256x192 crop."""
        return (self.input_size[1] // self.stride, self.input_size[0] // self.stride)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: 12 * C (3072 for S, 576 for L)."""
        return self.patch_size[0] * self.patch_size[1] * self.backbone_channels


# --------------------------------------------------------------------------------------- variants

VARIANTS: dict[str, DistilPoseConfig] = {
    "distilpose_s": DistilPoseConfig("distilpose_s", StemNet, StemNet.out_channels),
    "distilpose_l": DistilPoseConfig(
        "distilpose_l", HRNetW48ThreeStage, HRNetW48ThreeStage.out_channels
    ),
}
