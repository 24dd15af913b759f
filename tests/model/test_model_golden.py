"""DistilPose-S/L against the official implementation (tests/golden, recipe weights crc32-v1).

Order of checks, as tests/golden/README.md asks: the recipe weights' checksum first (a mismatch
makes every output comparison meaningless, so the forward fixture refuses to run without it), then
the network outputs on the golden input and on its mirror image.

Tolerances (float32, TF32 off), from README section 8 and issue 2 ("within 1e-4"), the tighter of
the two where both give one:

    coords (pred)               abs <= 1e-5
    scores, sigmas              abs <= 3e-5
    kpt_token                   abs <= 1e-4   (README recommends 2e-4; the issue's 1e-4 is tighter)
    vis_token  S                abs <= 1e-4   (values up to ~37)
    vis_token  L                max|d| <= 5e-5 * max|ref|  (relative: L's un-calibrated BatchNorm
                                statistics grow the visual tokens to ~1.2e7)
    backbone_feat_first8        max|d| <= 5e-5 * max|ref|

Flip-merge and decode (``test_*`` tensors) belong to the geometry tests of ``model/crops.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from model import DistilPose, create_model
from tests.model.tf32 import tf32_off
from tests.recipe import sha256_sorted_concat

GOLDEN_DIR = Path(__file__).parents[1] / "golden"
GOLDEN_FILES = {"distilpose_s": "golden_S.pt", "distilpose_l": "golden_L.pt"}
ABS_TOL = {"pred": 1e-5, "score": 3e-5, "sigma": 3e-5, "kpt_token": 1e-4}
VIS_TOL = {"distilpose_s": ("abs", 1e-4), "distilpose_l": ("rel", 5e-5)}
FEAT_REL_TOL = 5e-5


@dataclass
class GoldenRun:
    """Our outputs next to the reference for one variant, named like the golden file's keys."""

    variant: str
    net: DistilPose
    golden: dict
    ours: dict[str, torch.Tensor]


def load_golden(variant: str) -> dict:
    """The golden file of ``variant`` (plain tensors and containers: weights_only loads it)."""
    return torch.load(GOLDEN_DIR / GOLDEN_FILES[variant], weights_only=True)


def assert_checksum(net: DistilPose, golden: dict) -> None:
    """Recipe weights must be bit-identical (sha256) before any output is compared."""
    reference = golden["weights_checksum"]
    state_dict = net.state_dict()
    assert len(state_dict) == reference["n_keys"]
    ours = sha256_sorted_concat(state_dict)
    if ours != reference["sha256_sorted_concat"]:
        wrong = [
            key
            for key, total in reference["per_key_sum_float64"].items()
            if abs(state_dict[key].double().sum().item() - total) > 1e-4
        ]
        pytest.fail(f"recipe weights differ from the golden ones (sha256 {ours}); keys: {wrong}")


@torch.no_grad()
def run_outputs(net: DistilPose, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our outputs on x and x.flip(3), keyed like ``golden['outputs']``."""
    ours: dict[str, torch.Tensor] = {}
    features: list[torch.Tensor] = []
    hook = net.backbone.register_forward_hook(lambda _m, _i, feat: features.append(feat[:, :8]))
    for prefix, batch in (("", x), ("flipimg_", x.flip(3))):
        out = net(batch)
        ours[prefix + "pred"] = out.coords
        ours[prefix + "score"] = out.scores.unsqueeze(-1)  # golden: (B, K, 1)
        ours[prefix + "sigma"] = out.sigmas
        ours[prefix + "kpt_token"] = out.kpt_tokens
        ours[prefix + "vis_token"] = out.vis_tokens
    hook.remove()
    ours["backbone_feat_first8"] = features[0]  # the plain pass's backbone output
    return ours


def max_diffs(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """max |ours - ref| per tensor (on CPU, float64)."""
    return {k: (v.cpu().double() - ref[k].double()).abs().max().item() for k, v in ours.items()}


def check_outputs(variant: str, ours: dict[str, torch.Tensor], golden: dict) -> None:
    """Every output against the reference, with the tolerances of the module docstring."""
    ref = golden["outputs"]
    diffs = max_diffs(ours, ref)
    failures = []
    for key, diff in diffs.items():
        name = key.removeprefix("flipimg_")
        assert ours[key].shape == ref[key].shape, key
        if name in ABS_TOL:
            kind, tol = "abs", ABS_TOL[name]
        elif name == "vis_token":
            kind, tol = VIS_TOL[variant]
        else:
            kind, tol = "rel", FEAT_REL_TOL
        value = diff / ref[key].abs().max().item() if kind == "rel" else diff
        if not value <= tol:
            failures.append(f"{key}: {kind} diff {value:.3g} > {tol:g}")
    assert not failures, f"{variant} differs from golden: {failures}"


@pytest.fixture(scope="module", params=["distilpose_s", "distilpose_l"])
def golden_run(
    request: pytest.FixtureRequest,
    distilpose_s_checkpoint: Path,
    distilpose_l_checkpoint: Path,
) -> Iterator[GoldenRun]:
    """Load the official-layout recipe checkpoint, verify its checksum, run the golden input."""
    variant = request.param
    path = distilpose_s_checkpoint if variant == "distilpose_s" else distilpose_l_checkpoint
    golden = load_golden(variant)
    net = create_model(variant, weights=path)
    assert_checksum(net, golden)
    yield GoldenRun(variant, net, golden, run_outputs(net, golden["input"]))


def test_recipe_checksum_first(golden_run: GoldenRun) -> None:
    """sha256 equal (the fixture refuses to run the net otherwise) and the float64 sums agree."""
    reference = golden_run.golden["weights_checksum"]
    state_dict = golden_run.net.state_dict()
    assert sha256_sorted_concat(state_dict) == reference["sha256_sorted_concat"]
    sums = {k: state_dict[k].double().sum().item() for k in sorted(state_dict)}
    assert sum(sums.values()) == pytest.approx(reference["sum_float64"], abs=1e-3)
    abs_sum = sum(state_dict[k].double().abs().sum().item() for k in sorted(state_dict))
    assert abs_sum == pytest.approx(reference["abs_sum_float64"], abs=1e-3)
    for key, total in reference["per_key_sum_float64"].items():
        assert sums[key] == pytest.approx(total, abs=1e-4), key


@pytest.mark.parametrize("name", ["pred", "score", "sigma", "kpt_token", "vis_token"])
@pytest.mark.parametrize("prefix", ["", "flipimg_"])
def test_outputs_match_golden(golden_run: GoldenRun, prefix: str, name: str) -> None:
    """Plain and mirrored input: coords, scores, sigmas and both token sets."""
    key = prefix + name
    check_outputs(golden_run.variant, {key: golden_run.ours[key]}, golden_run.golden)


def test_backbone_features_match_golden(golden_run: GoldenRun) -> None:
    """Backbone channels 0..7 (relative: L's features reach ~7.8e6)."""
    key = "backbone_feat_first8"
    check_outputs(golden_run.variant, {key: golden_run.ours[key]}, golden_run.golden)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["distilpose_s", "distilpose_l"])
def test_golden_on_cuda_tf32_off(
    variant: str, distilpose_s_checkpoint: Path, distilpose_l_checkpoint: Path
) -> None:
    """The same comparison on CUDA, float32 with TF32 off (TF32 misses by 20-50x, README s.8)."""
    path = distilpose_s_checkpoint if variant == "distilpose_s" else distilpose_l_checkpoint
    golden = load_golden(variant)
    with tf32_off():
        net = create_model(variant, weights=path, device="cuda")
        assert_checksum(net, golden)
        ours = run_outputs(net, golden["input"].cuda())
    check_outputs(variant, ours, golden)
