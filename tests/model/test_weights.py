"""Weight files: strict official-layout loading, unsafe/corrupt files, safetensors, metadata."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from model import create_model
from model.interfaces import PoseModelInfo
from model.keypoints import COCO_KEYPOINT_NAMES
from model.weights import (
    KNOWN_WEIGHTS,
    WeightsError,
    convert_to_safetensors,
    load_state_dict,
    main,
    sha256_file,
)

HEAD = "keypoint_head.tokenhead."


@pytest.fixture(scope="module")
def s_state_dict(distilpose_s_checkpoint: Path) -> OrderedDict[str, torch.Tensor]:
    """The S recipe state_dict exactly as stored in the official-layout file."""
    return torch.load(distilpose_s_checkpoint, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def s_reference(distilpose_s_checkpoint: Path) -> torch.Tensor:
    """S coords on a small fixed batch, for comparing files that should hold the same weights."""
    net = create_model("distilpose_s", weights=distilpose_s_checkpoint)
    return net.predict(
        torch.randn(2, 3, 256, 192, generator=torch.Generator().manual_seed(0))
    ).coords


def save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def refused(path: Path, variant: str | None = None) -> str:
    """The WeightsError message ``load_state_dict`` raises for ``path``."""
    with pytest.raises(WeightsError) as info:
        load_state_dict(path, variant)
    return str(info.value)


# ---------------------------------------------------------------------------- accepted layouts


def test_official_layout_infers_variant_and_keeps_official_order(
    distilpose_s_checkpoint: Path, s_state_dict: OrderedDict[str, torch.Tensor]
) -> None:
    state_dict, variant = load_state_dict(distilpose_s_checkpoint)
    assert variant == "distilpose_s"
    assert list(state_dict) == list(s_state_dict)
    assert all(torch.equal(state_dict[k], s_state_dict[k]) for k in s_state_dict)


def test_l_checkpoint_is_inferred_as_l(distilpose_l_checkpoint: Path) -> None:
    state_dict, variant = load_state_dict(distilpose_l_checkpoint)
    assert variant == "distilpose_l"
    assert len(state_dict) == 1070
    assert state_dict[HEAD + "patch_to_embedding.weight"].shape == (192, 576)


def test_bare_state_dict_loads(tmp_path: Path, s_state_dict: dict) -> None:
    _, variant = load_state_dict(save(dict(s_state_dict), tmp_path / "bare.pth"))
    assert variant == "distilpose_s"


def test_module_prefix_is_stripped(tmp_path: Path, s_state_dict: dict) -> None:
    wrapped = {"module." + k: v for k, v in s_state_dict.items()}
    state_dict, _ = load_state_dict(save({"state_dict": wrapped}, tmp_path / "ddp.pth"))
    assert list(state_dict) == list(s_state_dict)


def test_teacher_keys_are_dropped(
    tmp_path: Path, s_state_dict: dict, s_reference: torch.Tensor
) -> None:
    extra = {
        "teacher.backbone.conv1.weight": torch.zeros(64, 3, 3, 3),
        "teacher_model.keypoint_head.tokenpose.mlp_head.0.weight": torch.zeros(192),
        "keypoint_head.tokenpose.keypoint_token": torch.zeros(1, 17, 192),
    }
    path = save({"state_dict": {**s_state_dict, **extra}}, tmp_path / "with_teacher.pth")
    state_dict, _ = load_state_dict(path)
    assert not any("teacher" in k or "tokenpose" in k for k in state_dict)
    net = create_model("distilpose_s", weights=path)
    x = torch.randn(2, 3, 256, 192, generator=torch.Generator().manual_seed(0))
    assert torch.equal(net.predict(x).coords, s_reference)


def test_mmcv_meta_with_numpy_scalars_and_optimizer_loads(
    tmp_path: Path, s_state_dict: dict
) -> None:
    """mmcv writes numpy scalars (e.g. the best AP) into meta: data, not code, so accepted."""
    meta = {"epoch": 210, "hook_msgs": {"best_score": np.float64(0.716), "it": np.int64(3)}}
    optimizer = {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"lr": 1e-3}]}
    path = save(
        {"meta": meta, "state_dict": s_state_dict, "optimizer": optimizer}, tmp_path / "m.pth"
    )
    assert load_state_dict(path)[1] == "distilpose_s"


def test_fp16_weights_are_cast_to_float32(tmp_path: Path, s_state_dict: dict) -> None:
    half = {k: v.half() if v.is_floating_point() else v for k, v in s_state_dict.items()}
    net = create_model(None, weights=save({"state_dict": half}, tmp_path / "half.pth"))
    assert net.keypoint_head.tokenhead.patch_to_embedding.weight.dtype == torch.float32


# ------------------------------------------------------------------------------ strict checks


def test_missing_key_is_named(tmp_path: Path, s_state_dict: dict) -> None:
    key = "backbone.layer1.2.bn3.running_var"
    broken = {k: v for k, v in s_state_dict.items() if k != key}
    message = refused(save({"state_dict": broken}, tmp_path / "missing.pth"))
    assert "missing" in message and key in message


def test_extra_key_is_named(tmp_path: Path, s_state_dict: dict) -> None:
    key = "backbone.layer2.0.conv1.weight"
    broken = {**s_state_dict, key: torch.zeros(3)}
    message = refused(save({"state_dict": broken}, tmp_path / "extra.pth"))
    assert "unexpected" in message and key in message


def test_wrong_shape_is_named(tmp_path: Path, s_state_dict: dict) -> None:
    key = HEAD + "transformer.layers.3.1.fn.fn.net.0.weight"
    broken = {**s_state_dict, key: torch.zeros(577, 192)}
    message = refused(save({"state_dict": broken}, tmp_path / "shape.pth"))
    assert key in message and "(577, 192)" in message and "(576, 192)" in message


def test_non_tensor_entry_is_refused(tmp_path: Path, s_state_dict: dict) -> None:
    broken = {**s_state_dict, "backbone.conv1.weight": [1.0, 2.0]}
    message = refused(save({"state_dict": broken}, tmp_path / "list.pth"))
    assert "backbone.conv1.weight" in message


def test_file_without_state_dict_is_refused(tmp_path: Path) -> None:
    assert "no state_dict" in refused(save({"meta": {"epoch": 1}}, tmp_path / "nosd.pth"))
    assert "no state_dict" in refused(save([1, 2, 3], tmp_path / "list.pth"))


def test_wrong_variant_is_refused(distilpose_s_checkpoint: Path) -> None:
    with pytest.raises(WeightsError, match=r"holds distilpose_s weights .* distilpose_l"):
        create_model("distilpose_l", weights=distilpose_s_checkpoint)


def test_unknown_patch_embedding_shape_is_refused(tmp_path: Path, s_state_dict: dict) -> None:
    broken = {**s_state_dict, HEAD + "patch_to_embedding.weight": torch.zeros(192, 100)}
    message = refused(save({"state_dict": broken}, tmp_path / "variant.pth"))
    assert "cannot infer" in message and "(192, 100)" in message


def test_teacher_checkpoint_is_recognised(tmp_path: Path, s_state_dict: dict) -> None:
    teacher = {k.replace("tokenhead", "tokenpose"): v for k, v in s_state_dict.items()}
    assert "teacher checkpoint" in refused(save({"state_dict": teacher}, tmp_path / "t.pth"))


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        create_model("distilpose_s", weights=tmp_path / "nope.pth")


# ---------------------------------------------------------------------- unsafe and broken files


class Hostile:
    """Unpickling this would create ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_hostile_pickle_is_refused_and_never_runs(
    tmp_path: Path, s_state_dict: dict, zip_format: bool
) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pth"
    obj = {"meta": {"note": Hostile(marker)}, "state_dict": s_state_dict}
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    message = refused(path)
    assert "refusing" in message and "exec" in message
    with pytest.raises(WeightsError):
        create_model("distilpose_s", weights=path)
    assert not marker.exists()


def test_plain_pickle_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps(Hostile(marker), protocol=2))
    refused(path)
    assert not marker.exists()


def test_corrupt_bytes_are_refused(tmp_path: Path, distilpose_s_checkpoint: Path) -> None:
    data = bytearray(distilpose_s_checkpoint.read_bytes())
    middle = len(data) // 2  # inside tensor storage: torch.load alone would not notice
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path = tmp_path / "corrupt.pth"
    path.write_bytes(bytes(data))
    assert "corrupt" in refused(path)


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "noise.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    refused(path)


def test_truncated_file_is_refused(tmp_path: Path, distilpose_s_checkpoint: Path) -> None:
    data = distilpose_s_checkpoint.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in refused(path)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    assert "empty" in refused(path)


# --------------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip(
    tmp_path: Path, distilpose_s_checkpoint: Path, s_reference: torch.Tensor
) -> None:
    dst = tmp_path / "distilpose_s.safetensors"
    digest = convert_to_safetensors(distilpose_s_checkpoint, dst)
    assert digest == sha256_file(dst) and len(digest) == 64
    with safe_open(str(dst), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["variant"] == "distilpose_s"
    assert metadata["source_sha256"] == sha256_file(distilpose_s_checkpoint)
    net = create_model(None, weights=dst)
    assert net.config.name == "distilpose_s"
    assert net.weights_sha256 == digest
    x = torch.randn(2, 3, 256, 192, generator=torch.Generator().manual_seed(0))
    assert torch.equal(net.predict(x).coords, s_reference)


def test_convert_cli_reports_sha256(
    tmp_path: Path, distilpose_s_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "cli.safetensors"
    assert main(["convert", str(distilpose_s_checkpoint), str(dst)]) == 0
    assert f"sha256={sha256_file(dst)}" in capsys.readouterr().out
    assert main(["info", str(dst)]) == 0
    assert "variant=distilpose_s" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing.pth")]) == 1
    assert "error:" in capsys.readouterr().err


def test_corrupt_safetensors_is_refused(tmp_path: Path, distilpose_s_checkpoint: Path) -> None:
    dst = tmp_path / "s.safetensors"
    convert_to_safetensors(distilpose_s_checkpoint, dst)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(dst.read_bytes()[:1000])
    assert "safetensors" in refused(broken)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    refused(garbage)


# ------------------------------------------------------------------------------------ metadata


def test_known_weights_metadata() -> None:
    s, l_ = KNOWN_WEIGHTS["distilpose_s"], KNOWN_WEIGHTS["distilpose_l"]
    assert (s.coco_val_ap, l_.coco_val_ap) == (71.6, 74.4)
    assert (s.trainable_params, l_.trainable_params) == (5_364_101, 21_265_637)
    assert (s.extraction_code, l_.extraction_code) == ("3733", "5tni")
    assert s.url.startswith("https://pan.baidu.com/") and "distilpose_s.pth" in s.file_names
    for meta in (s, l_):
        assert meta.input_size == (192, 256)
        assert meta.mean == (0.485, 0.456, 0.406) and meta.std == (0.229, 0.224, 0.225)
        assert meta.keypoint_names == COCO_KEYPOINT_NAMES
        assert [list(p) for p in meta.flip_pairs] == [[2 * i + 1, 2 * i + 2] for i in range(8)]


def test_net_info_and_sha256_come_from_the_weights(distilpose_s_checkpoint: Path) -> None:
    net = create_model("distilpose_s", weights=distilpose_s_checkpoint)
    assert isinstance(net.info, PoseModelInfo)
    assert net.info == KNOWN_WEIGHTS["distilpose_s"].info
    assert net.info.name == "distilpose_s" and net.info.aspect == 0.75
    assert net.weights_sha256 == sha256_file(distilpose_s_checkpoint)
    assert create_model("distilpose_s").weights_sha256 is None
