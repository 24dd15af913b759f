"""DistilPose weight files: safe loading of the official layout, safetensors, sha256, metadata.

Official checkpoints are mmcv 1.x files, ``{"meta": ..., "state_dict": OrderedDict, ("optimizer")}``
with ``backbone.*`` and ``keypoint_head.tokenhead.*`` keys (``distilpose-spec.md`` sections 1.3 and
2.5). ``load_state_dict`` also accepts a bare state_dict and ``.safetensors`` files, and:

* never unpickles arbitrary objects: ``torch.load(weights_only=True)``; only numpy scalars and
  dtypes (which mmcv writes into ``meta``, e.g. a best AP as ``numpy.float64``) are allowed on top
  of PyTorch's tensor/container allowlist. Anything else is refused, naming the offending global;
* strips a ``module.`` prefix and drops teacher keys (``model.distilpose.is_teacher_key``: any key
  whose first component contains "teacher", and the TokenPose teacher head
  ``keypoint_head.tokenpose.*``);
* infers the variant from ``keypoint_head.tokenhead.patch_to_embedding.weight``: (192, 3072) is
  DistilPose-S, (192, 576) is DistilPose-L;
* is strict: every missing, unexpected or mis-shaped key is an error that names the key.

Run ``python -m model.weights convert SRC DST.safetensors`` to convert a checkpoint (prints sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.distilpose import VARIANTS, DistilPose, checkpoint_filter_fn
from model.interfaces import PoseModelInfo
from model.keypoints import COCO_KEYPOINT_NAMES, flip_pairs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_EMBED_KEY = "keypoint_head.tokenhead.patch_to_embedding.weight"
MAX_LISTED_KEYS = 10


class WeightsError(ValueError):
    """A weight file that cannot be used: unreadable, unsafe, or not matching the model."""


# --------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class WeightsMeta:
    """What a published DistilPose weight file is and what it expects (cf. torchvision ``Weights``).

    ``sha256`` is None: the official files are on Baidu Pan only and could not be fetched to record
    it; ``net.weights_sha256`` reports the hash of whatever file was actually loaded.
    """

    variant: str
    file_names: tuple[str, ...]
    url: str
    extraction_code: str
    coco_val_ap: float  # COCO val2017, AP56 detector boxes, flip test (official README)
    params_m: float  # README figure, millions
    trainable_params: int  # exact trainable count (excludes the frozen pos_embedding)
    gflops: float  # mmcv counter, 256x192 input, no flip
    input_size: tuple[int, int] = (192, 256)  # (W, H)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB in [0, 1] units
    std: tuple[float, float, float] = IMAGENET_STD
    keypoint_names: tuple[str, ...] = COCO_KEYPOINT_NAMES
    flip_pairs: tuple[tuple[int, int], ...] = tuple(flip_pairs(COCO_KEYPOINT_NAMES))
    padding: float = 1.25
    pixel_std: float = 200.0
    sha256: str | None = None
    source: str = "github.com/yshMars/DistilPose (README, commit 91651a8)"

    @property
    def info(self) -> PoseModelInfo:
        """The ``PoseModelInfo`` the pipeline needs to crop and normalise for these weights."""
        return PoseModelInfo(
            name=self.variant,
            input_size=self.input_size,
            mean=self.mean,
            std=self.std,
            padding=self.padding,
            keypoint_names=self.keypoint_names,
            pixel_std=self.pixel_std,
        )


KNOWN_WEIGHTS: dict[str, WeightsMeta] = {
    "distilpose_s": WeightsMeta(
        variant="distilpose_s",
        file_names=("distilpose_s.pth",),
        url="https://pan.baidu.com/s/16k7nwQ9vaqJakxtpP0-o8g",
        extraction_code="3733",
        coco_val_ap=71.6,
        params_m=5.4,
        trainable_params=5_364_101,
        gflops=2.38,
    ),
    "distilpose_l": WeightsMeta(
        variant="distilpose_l",
        file_names=("distilpose_l.pth",),  # the README names no file for L
        url="https://pan.baidu.com/s/1I8MiunGjDNolnj-2246WIg",
        extraction_code="5tni",
        coco_val_ap=74.4,
        params_m=21.3,
        trainable_params=21_265_637,
        gflops=10.33,
    ),
}


# ----------------------------------------------------------------------------------- file reading


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _numpy_scalar_globals() -> list[Any]:
    """numpy scalar/dtype reconstructors (for mmcv ``meta``): they rebuild numbers, run no code."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed: list[Any] = [
        np.dtype,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
    ]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return allowed


def _check_zip_integrity(path: Path) -> None:
    """Verify the CRC-32 of every record of a zip-format checkpoint (``torch.save`` default).

    ``torch.load`` does not check CRCs, so flipped bytes inside tensor data would load silently.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise WeightsError(
            f"{path} is a damaged checkpoint archive (truncated?): {str(exc)[:200]}"
        ) from None
    if bad is not None:
        raise WeightsError(f"{path} is corrupt: CRC-32 mismatch in record {bad!r}")


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; clear errors for unsafe, corrupt or truncated files."""
    if path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty")
    if zipfile.is_zipfile(path):
        _check_zip_integrity(path)
    else:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip's first record but no central directory
                raise WeightsError(f"{path} is a truncated checkpoint (zip archive has no end)")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        unsafe = re.search(r"GLOBAL ([\w.]+)", message)
        if unsafe:
            raise WeightsError(
                f"refusing to load {path}: it needs the Python object {unsafe.group(1)!r}, not "
                "only tensors and plain containers, and unpickling it could run code. Load files "
                "only from a trusted source; convert trusted ones to .safetensors."
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        detail = reason.group(1).strip() if reason else message.splitlines()[0]
        raise WeightsError(
            f"{path} is not a PyTorch checkpoint the safe loader accepts ({detail[:200]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from None


def _read_raw(path: Path) -> Mapping[str, Any]:
    """The raw key -> value mapping of a weight file (torch checkpoint or safetensors)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from None
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"]  # mmcv layout; "meta" and "optimizer" are ignored
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    top = list(obj)[:MAX_LISTED_KEYS] if isinstance(obj, Mapping) else type(obj).__name__
    raise WeightsError(
        f"{path} holds no state_dict: expected a dict of tensors or {{'state_dict': ...}}, "
        f"got {top}"
    )


# ------------------------------------------------------------------------------------ validation


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return ", ".join(keys[:MAX_LISTED_KEYS]) + more


def infer_variant(state_dict: Mapping[str, torch.Tensor], had_teacher_head: bool = False) -> str:
    """The variant whose patch embedding matches ``patch_to_embedding.weight`` (S: 3072, L: 576)."""
    weight = state_dict.get(PATCH_EMBED_KEY)
    if weight is None:
        hint = (
            " It holds the TokenPose teacher's head (keypoint_head.tokenpose.*): this is the "
            "teacher checkpoint, not a DistilPose student."
            if had_teacher_head
            else ""
        )
        raise WeightsError(
            f"cannot infer the DistilPose variant: no key {PATCH_EMBED_KEY!r}.{hint}"
        )
    for name, config in VARIANTS.items():
        if tuple(weight.shape) == (config.dim, config.patch_dim):
            return name
    raise WeightsError(
        f"cannot infer the DistilPose variant: {PATCH_EMBED_KEY} has shape {tuple(weight.shape)}, "
        "expected (192, 3072) for distilpose_s or (192, 576) for distilpose_l"
    )


def expected_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """The variant's state_dict as meta tensors (names, shapes, dtypes; official order)."""
    with torch.device("meta"):
        model = DistilPose(VARIANTS[variant], KNOWN_WEIGHTS[variant].info)
    return model.state_dict()


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], variant: str
) -> OrderedDict[str, torch.Tensor]:
    """Strict key/shape/dtype check; returns the entries in ``expected``'s order.

    Raises:
        WeightsError: naming every missing, unexpected or mis-shaped key (up to 10 of each).
    """
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    bad_shape = [
        f"{k} {tuple(state_dict[k].shape)} != expected {tuple(t.shape)}"
        for k, t in expected.items()
        if k in state_dict and state_dict[k].shape != t.shape
    ]
    bad_dtype = [
        f"{k} {state_dict[k].dtype} != expected {t.dtype}"
        for k, t in expected.items()
        if k in state_dict and state_dict[k].dtype.is_floating_point != t.dtype.is_floating_point
    ]
    problems = [
        f"{label} key(s): {_listed(keys)}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", bad_shape),
            ("wrong-dtype", bad_dtype),
        )
        if keys
    ]
    if problems:
        raise WeightsError(f"weights do not match {variant}: " + "; ".join(problems))
    # Float weights stored in another float dtype (e.g. fp16) are cast to the model's dtype.
    return OrderedDict((k, state_dict[k].to(t.dtype)) for k, t in expected.items())


def load_state_dict(
    path: Path | str, variant: str | None = None
) -> tuple[OrderedDict[str, torch.Tensor], str]:
    """Load and strictly validate a DistilPose weight file.

    Args:
        path: official checkpoint (``.pth``/``.pt``: mmcv layout or bare state_dict) or
            ``.safetensors``.
        variant: the variant the caller wants; None infers it from the keys.

    Returns:
        (state_dict in the official key order, variant name).

    Raises:
        FileNotFoundError: no such file.
        WeightsError: unsafe, corrupt, truncated, wrong variant, or any key mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    raw = _read_raw(path)
    bad = [repr(k) for k, v in raw.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise WeightsError(f"{path}: state_dict entries that are not tensors: {_listed(bad)}")
    state_dict = checkpoint_filter_fn(raw)
    had_teacher_head = any(k.startswith("keypoint_head.tokenpose.") for k in raw)
    found = infer_variant(state_dict, had_teacher_head)
    if variant is not None and variant != found:
        shape = tuple(state_dict[PATCH_EMBED_KEY].shape)
        raise WeightsError(
            f"{path} holds {found} weights ({PATCH_EMBED_KEY} {shape}), but {variant} was requested"
        )
    return check_state_dict(state_dict, expected_state_dict(found), found), found


# ------------------------------------------------------------------------------------- conversion


def convert_to_safetensors(src: Path | str, dst: Path | str) -> str:
    """Validate ``src`` (any accepted format) and write it as ``.safetensors``; returns its sha256.

    The file records ``variant`` and ``source_sha256`` (hash of ``src``) in its metadata.
    """
    state_dict, variant = load_state_dict(src)
    dst = Path(dst)
    metadata = {"format": "pt", "variant": variant, "source_sha256": sha256_file(src)}
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    save_file(tensors, dst, metadata=metadata)
    return sha256_file(dst)


def main(argv: list[str] | None = None) -> int:
    """``python -m model.weights convert SRC DST`` and ``python -m model.weights info PATH``."""
    parser = argparse.ArgumentParser(prog="python -m model.weights", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="official checkpoint -> .safetensors (prints sha256)")
    convert.add_argument("src", type=Path)
    convert.add_argument("dst", type=Path)
    info = sub.add_parser("info", help="validate a weight file; print its variant and sha256")
    info.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            digest = convert_to_safetensors(args.src, args.dst)
            sys.stdout.write(f"{args.dst}  sha256={digest}\n")
        else:
            _, variant = load_state_dict(args.path)
            sys.stdout.write(f"{args.path}  variant={variant}  sha256={sha256_file(args.path)}\n")
    except (WeightsError, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
