"""DistilPose architecture: official state_dict layout, parameter counts, outputs, create_model.

Numbers against the official implementation are in test_model_golden.py; here the full models are
only built on the meta device (no storage), and behaviour is checked on a tiny config.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from model import VARIANTS, DistilPose, DistilPoseConfig, create_model
from model.distilpose import checkpoint_filter_fn, is_teacher_key, sine_position_table
from model.interfaces import PoseModel, PoseOutput
from model.weights import KNOWN_WEIGHTS, expected_state_dict

GOLDEN_DIR = Path(__file__).parents[1] / "golden"
KEY_FILES = {"distilpose_s": "keys_S.txt", "distilpose_l": "keys_L.txt"}
POS_EMBEDDING_SUM = 24186.456709835235  # tests/golden/README.md, section 2.1


class TinyBackbone(nn.Module):
    """Stride-4 stand-in backbone with 8 channels, for fast behavioural tests."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


TINY = DistilPoseConfig("tiny", TinyBackbone, 8, depth=2)


@pytest.fixture(scope="module")
def tiny() -> DistilPose:
    torch.manual_seed(0)
    net = DistilPose(TINY, KNOWN_WEIGHTS["distilpose_s"].info)
    net.init_weights()
    head = net.keypoint_head.tokenhead.mlp_head[1]
    assert isinstance(head, nn.Linear)
    with torch.no_grad():  # larger head weights so that outputs differ between inputs
        head.weight.normal_(std=0.5)
    return net.eval()


def read_key_file(variant: str) -> list[tuple[str, str, str]]:
    lines = (GOLDEN_DIR / KEY_FILES[variant]).read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines]  # type: ignore[misc]


@pytest.mark.parametrize("variant", ["distilpose_s", "distilpose_l"])
def test_state_dict_matches_official_keys(variant: str) -> None:
    """Names, order, shapes and dtypes equal keys_{S,L}.txt, so official files load strictly."""
    ours = [
        (k, str(tuple(t.shape)), str(t.dtype).removeprefix("torch."))
        for k, t in expected_state_dict(variant).items()
    ]
    assert ours == read_key_file(variant)


@pytest.mark.parametrize(
    ("variant", "trainable", "total"),
    [("distilpose_s", 5_364_101, 5_413_253), ("distilpose_l", 21_265_637, 21_314_789)],
)
def test_parameter_counts_match_paper(variant: str, trainable: int, total: int) -> None:
    with torch.device("meta"):
        net = DistilPose(VARIANTS[variant], KNOWN_WEIGHTS[variant].info)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == trainable
    assert sum(p.numel() for p in net.parameters()) == total
    assert not net.keypoint_head.tokenhead.pos_embedding.requires_grad


def test_sine_table_matches_official() -> None:
    table = sine_position_table(16, 16, 192)
    assert table.shape == (1, 256, 192) and table.dtype == torch.float32
    assert table.double().sum().item() == pytest.approx(POS_EMBEDDING_SUM, abs=1e-6)
    # Token t = row * 16 + col; channels 0..95 depend on the row only, 96..191 on the column.
    grid = table.reshape(16, 16, 192)
    assert torch.equal(grid[:, 0, :96], grid[:, 7, :96])
    assert torch.equal(grid[0, :, 96:], grid[9, :, 96:])


def test_forward_shapes_and_ranges(tiny: DistilPose) -> None:
    x = torch.randn(3, 3, 256, 192)
    with torch.no_grad():
        out = tiny(x)
    assert out.coords.shape == (3, 17, 2) and out.scores.shape == (3, 17)
    assert out.sigmas.shape == (3, 17, 2)
    assert out.kpt_tokens.shape == (3, 17, 192) and out.vis_tokens.shape == (3, 256, 192)
    assert ((out.coords > 0) & (out.coords < 1)).all() and (out.sigmas > 0).all()


def test_batch_items_are_independent(tiny: DistilPose) -> None:
    x = torch.randn(4, 3, 256, 192, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = tiny(x).coords
        single = torch.cat([tiny(x[i : i + 1]).coords for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-6)
    assert not torch.allclose(batched[0], batched[1], atol=1e-4)


def test_predict_follows_the_pose_model_contract(tiny: DistilPose) -> None:
    assert isinstance(tiny, PoseModel)
    x = torch.randn(2, 3, 256, 192)
    out = tiny.predict(x)
    assert isinstance(out, PoseOutput) and out.sigmas is not None
    with torch.no_grad():
        raw = tiny(x)
    torch.testing.assert_close(out.coords, raw.coords)
    torch.testing.assert_close(out.scores, raw.scores)
    # heatmap cells (stride 4) -> [0, 1] crop units: x over 192 px, y over 256 px
    torch.testing.assert_close(out.sigmas[..., 0], raw.sigmas[..., 0] * 4 / 192)
    torch.testing.assert_close(out.sigmas[..., 1], raw.sigmas[..., 1] * 4 / 256)
    assert not out.coords.requires_grad


def test_predict_casts_crops_to_the_model_dtype(tiny: DistilPose) -> None:
    net = DistilPose(TINY, tiny.info)
    net.load_state_dict(tiny.state_dict())
    net = net.double().eval()
    out = net.predict(torch.randn(1, 3, 256, 192))
    assert out.coords.dtype == torch.float32 and out.sigmas is not None
    assert out.sigmas.dtype == torch.float32


def test_the_head_runs_in_float32_under_autocast(tiny: DistilPose) -> None:
    """bf16 autocast runs the backbone and the transformer in bf16 and the 5-output head in
    float32: in bf16, sigmoid(x, y) would step by up to 1/256 of the crop (recipe weights, four
    crops of a real photo: 1.32 crop px at most from fp32 with a bf16 head, 0.75 without)."""
    x = torch.randn(2, 3, 256, 192, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp32 = tiny(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(x)
    assert not torch.equal(low.kpt_tokens, fp32.kpt_tokens)  # the matmuls did run in bf16
    assert low.coords.dtype == torch.float32 and low.sigmas.dtype == torch.float32
    assert low.scores.dtype == torch.float32


def test_model_is_trainable(tiny: DistilPose) -> None:
    """Gradients reach the backbone and keypoint tokens, not the frozen position table."""
    net = DistilPose(replace(TINY, depth=1), tiny.info).train()
    out = net(torch.randn(2, 3, 256, 192))
    (out.coords.sum() + out.scores.sum() + out.sigmas.sum()).backward()
    head = net.keypoint_head.tokenhead
    assert isinstance(net.backbone, TinyBackbone)
    assert net.backbone.conv.weight.grad is not None and head.keypoint_token.grad is not None
    assert head.pos_embedding.grad is None


def test_checkpoint_filter_strips_prefix_and_drops_teacher() -> None:
    t = torch.zeros(1)
    state_dict = {
        "module.backbone.conv1.weight": t,
        "module.teacher.backbone.conv1.weight": t,
        "keypoint_head.tokenpose.mlp_head.0.weight": t,
        "teacher_backbone.layer1.0.conv1.weight": t,
    }
    assert list(checkpoint_filter_fn(state_dict)) == ["backbone.conv1.weight"]
    assert not is_teacher_key("keypoint_head.tokenhead.keypoint_token")


def test_create_model_random_init() -> None:
    net = create_model("distilpose_s")
    assert not net.training and net.weights_sha256 is None
    assert net.info.name == "distilpose_s" and net.info.input_size == (192, 256)


def test_create_model_rejects_bad_arguments() -> None:
    with pytest.raises(KeyError, match="unknown model"):
        create_model("distilpose_xl")
    with pytest.raises(ValueError, match="needs a model name"):
        create_model(None)


def test_importing_model_loads_no_serving_stack() -> None:
    """The model layer knows nothing of HTTP, gRPC, metrics or settings."""
    code = (
        "import sys, model, model.distilpose, model.hrnet, model.weights\n"
        "serving = ('fastapi', 'grpc', 'prometheus_client', 'pydantic')\n"
        "bad = [m for m in serving if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
