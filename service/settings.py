"""The one settings class of the service: every knob, unit in its name, from flags or ``POSE_*``.

Precedence: explicit constructor arguments (the command-line flags) > ``POSE_*`` environment
variables > defaults. Misspelt keys are errors, not silently ignored: an unknown keyword is refused
by pydantic (``extra="forbid"``), an unknown ``POSE_*`` environment variable by ``_check_environ``
(pydantic-settings itself ignores unknown environment variables). The only ``POSE_*`` names let
through are those Kubernetes injects for a Service called ``pose`` (``POSE_SERVICE_HOST``,
``POSE_PORT_8000_TCP``, ...), so a pod in such a namespace still starts, and ``POSE_API_KEY``, the
client's key (``pose-client``).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from service.cpu_quota import usable_cpus
from service.engine_api import EngineConfig, RequestLimits

ENV_PREFIX = "POSE_"
MIB = 1024 * 1024

# Service-link variables Kubernetes sets for a Service named "pose" (docker links look the same).
_SERVICE_LINK = re.compile(
    r"^POSE_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT|PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)$"
)
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
# The client's key (``pose-client``, ``service.client.cli``): not a setting, but may share the
# server's environment (a sidecar, a shell that runs both), so it is let through.
_CLIENT_VARIABLES = frozenset({"POSE_API_KEY"})


class UnknownSettingError(ValueError):
    """A ``POSE_*`` environment variable that names no setting."""


class Settings(BaseSettings):
    """Everything the service can be told. Each field is also the flag ``--kebab-case-name`` of
    ``pose-service serve`` and the environment variable ``POSE_UPPER_CASE_NAME``.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, frozen=True
    )

    # What is served.
    model: str | None = Field(
        default=None,
        description="pose model: distilpose_s, distilpose_l, blazepose_full, or identity (no "
        "network: answers the caller's boxes, to measure the serving path); default: inferred "
        "from --weights, else the cached reference model blazepose_full",
    )
    weights: str | None = Field(
        default=None, description="pose weights (official .pth or .safetensors)"
    )
    detector: str = Field(
        default="auto",
        description="person detector: a torchvision detector name, ssdlite_person, none, or auto "
        "(ssdlite_person when the reference models are cached, else none)",
    )
    detector_weights: str | None = Field(default=None, description="detector weights file")
    device: str = Field(
        default="cpu", description="cpu, cuda, cuda:N, or a comma list (one worker each)"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="default compute precision on CUDA; on CPU fp32, except bf16 with the "
        "openvino backend on a CPU that has bf16",
    )
    backend: Literal["torch", "openvino", "onnxruntime", "auto"] = Field(
        default="auto",
        description="what runs the networks: torch, or the exported ONNX graph under openvino or "
        "onnxruntime (CPU only); auto: on CPU openvino, else onnxruntime, else torch (whichever "
        "is installed: the cpu-fast extra), on CUDA torch",
    )
    flip_test: bool = Field(default=True, description="default for flip test (the paper's setting)")
    allow_random_weights: bool = Field(
        default=False,
        description="allow --model distilpose_s|distilpose_l without weights (smoke runs)",
    )
    cache_dir: str = Field(
        default="~/.cache/distilpose-service", description="cache of the converted reference models"
    )

    # The person detector (None: the detector's own default, which differs between detectors).
    detector_score_threshold: float | None = Field(
        default=None, ge=0, le=1, description="keep persons scored above this (0..1)"
    )
    detector_nms_iou: float | None = Field(
        default=None, ge=0, le=1, description="IoU threshold of the detector's NMS (0..1)"
    )
    detector_max_persons: int | None = Field(
        default=None, ge=1, description="most persons per image (the best-scored)"
    )
    detector_min_box_size_px: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="drop persons whose box width or height is below this",
    )
    detector_min_size_px: int | None = Field(
        default=None,
        ge=1,
        description="torchvision detectors: input resize, shorter side (speed vs recall; "
        "an error with ssdlite_person, whose input is a fixed 300x300)",
    )
    detector_max_size_px: int | None = Field(
        default=None,
        ge=1,
        description="torchvision detectors: input resize, cap of the longer side (an error with "
        "ssdlite_person and ssdlite320_mobilenet_v3_large, whose inputs are square)",
    )

    # Where it listens.
    host: str = Field(default="0.0.0.0", description="address both servers bind")
    http_port: int = Field(default=8000, ge=0, le=65535, description="HTTP port (0: any free port)")
    grpc_port: int = Field(
        default=50051, ge=0, le=65535, description="gRPC port (0: any free port)"
    )

    # Processes.
    frontends: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="front-end processes serving HTTP and gRPC on the same ports (SO_REUSEPORT) in "
        "front of one engine process; 1 runs everything in one process (default: 1 on the CPU, "
        "min(4, CPUs / 4) with CUDA, counting the CPUs this container may use: its CPU limit, "
        "its affinity)",
    )

    # The engine (Triton's three knobs and friends).
    max_batch_size: int = Field(default=16, ge=1, description="most images in one pipeline batch")
    max_delay_ms: float = Field(
        default=2.0, ge=0, description="how long a batch's first image waits"
    )
    max_queue_size: int = Field(default=128, ge=1, description="queued images before 429")
    max_queue_wait_ms: float | None = Field(
        default=None,
        gt=0,
        description="refuse (429) a request expected to wait longer than this in the queue "
        "(default: only one that would miss its deadline)",
    )
    max_crops_per_batch: int = Field(
        default=256,
        ge=1,
        description="most person crops in one forward (an upper bound: the batcher picks the "
        "size its measured cost curve says pays)",
    )
    calibration_budget_s: float = Field(
        default=15.0,
        ge=0,
        description="seconds each worker may spend after warm-up timing forwards of 1, 2, 3, 4, "
        "6, ... crops, the cost curve batches are sized from (0: skip; live batches refine it)",
    )
    decode_workers: int = Field(default=2, ge=1, description="threads decoding uploads")
    gpu_decode: bool = Field(
        default=False,
        description="decode JPEG uploads on the GPU (nvJPEG, batched in the worker) when every "
        "worker is on one CUDA device; other images, and CMYK or EXIF-rotated JPEGs, stay on the "
        "CPU decode pool. Off until `python -m bench.decode --device cuda` on the serving GPU "
        "shows it wins",
    )
    warmup: bool = Field(default=True, description="run a dummy batch before turning ready")
    drain_grace_s: float = Field(
        default=30.0, ge=0, description="time for in-flight work on SIGTERM"
    )

    # Limits of one request.
    max_body_bytes: int = Field(default=32 * MIB, ge=1, description="largest HTTP request body")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="largest width x height")
    max_inflight_image_bytes: int = Field(
        default=1024 * MIB,
        ge=1,
        description="most bytes of decoded images held by admitted requests; beyond it 429",
    )
    max_boxes: int = Field(default=100, ge=1, description="most caller boxes per image")
    max_boxes_per_job: int = Field(
        default=16,
        ge=1,
        description="a request with more caller boxes runs as several batched jobs of this many",
    )
    min_box_size_px: float = Field(
        default=2.0, gt=0, le=1e7, description="smallest caller box width and height, in pixels"
    )
    max_images_per_request: int = Field(
        default=32, ge=1, description="most images per batch request"
    )
    request_timeout_ms: int = Field(default=30_000, ge=1, description="deadline of one request")
    grpc_max_message_bytes: int = Field(default=32 * MIB, ge=1, description="largest gRPC message")
    stream_window: int = Field(default=8, ge=1, description="frames in flight per gRPC stream")

    # Video: tracked streams and video files (``service.tracking``, ``POST /v1/pose/video``).
    track_max_unseen_frames: int = Field(
        default=30, ge=0, le=100_000, description="a track unseen for more frames is retired"
    )
    track_min_score: float = Field(
        default=0.3,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="a person on tracked boxes scoring below this (mean keypoint score) is lost: "
        "the detector runs on the next frame",
    )
    max_video_frames: int = Field(
        default=18_000, ge=1, description="most frames of one video file (POST /v1/pose/video)"
    )
    max_video_seconds: float = Field(
        default=600.0,
        gt=0,
        allow_inf_nan=False,
        description="longest video file, in seconds of video (POST /v1/pose/video)",
    )

    # Connections: what one client may hold open, and for how long.
    http_max_connections: int = Field(
        default=1000, ge=1, description="HTTP connections and requests at once; beyond it 503"
    )
    http_keepalive_timeout_s: int = Field(
        default=5, ge=1, description="an idle HTTP keep-alive connection is closed after this"
    )
    http_max_header_bytes: int = Field(
        default=64 * 1024, ge=1024, description="largest HTTP request head (line and headers)"
    )
    http_body_timeout_s: float = Field(
        default=30.0, gt=0, description="the whole request body must arrive within this (408)"
    )
    grpc_max_concurrent_streams: int = Field(
        default=100, ge=1, description="concurrent calls and streams per gRPC connection"
    )
    grpc_max_connection_idle_s: float = Field(
        default=300.0, gt=0, description="a gRPC connection with no call is closed after this"
    )
    grpc_max_connection_age_s: float = Field(
        default=3600.0, gt=0, description="a gRPC connection is asked to reconnect after this"
    )
    grpc_keepalive_min_interval_s: float = Field(
        default=10.0, gt=0, description="clients pinging more often than this are disconnected"
    )

    # Access and logs.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="accepted API keys, comma-separated (empty: no authentication)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="log level"
    )
    access_log: bool = Field(
        default=True,
        description="one log line per HTTP request (logger service.access, at info); off saves "
        "a front end about 15 us of CPU per request (8 per cent of an identity-model request "
        "here), for high request rates where the metrics are enough",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment (checked for unknown ``POSE_*`` names); no dotenv."""
        _check_environ(os.environ, set(cls.model_fields))
        return init_settings, env_settings

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        """Accept ``"k1,k2"`` (environment, flag) as well as a list."""
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        """Keys are non-empty header-safe tokens."""
        for key in value:
            if not key or any(c.isspace() or not c.isprintable() for c in key):
                raise ValueError("API keys must be printable and contain no spaces")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        """``cpu``, ``cuda``, ``cuda:N`` or a comma list of them."""
        parts = [part.strip() for part in value.split(",")]
        if not parts or any(not _DEVICE.match(part) for part in parts):
            raise ValueError(f"device must be cpu, cuda, cuda:N or a comma list, got {value!r}")
        return ",".join(parts)

    @field_validator(
        "model",
        "weights",
        "detector_weights",
        "detector_score_threshold",
        "detector_nms_iou",
        "detector_max_persons",
        "detector_min_box_size_px",
        "detector_min_size_px",
        "detector_max_size_px",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        """An empty value (``POSE_WEIGHTS=``, ``POSE_DETECTOR_NMS_IOU=``) means unset."""
        return None if value == "" else value

    @field_validator("detector")
    @classmethod
    def _lower_detector(cls, value: str) -> str:
        """Detector names are case-insensitive."""
        return value.strip().lower()

    @model_validator(mode="after")
    def _check_resize(self) -> Settings:
        """The input resize's cap of the longer side is not below its shorter side."""
        low, high = self.detector_min_size_px, self.detector_max_size_px
        if low is not None and high is not None and high < low:
            raise ValueError(
                f"detector_max_size_px ({high}) must be >= detector_min_size_px ({low})"
            )
        return self

    def engine_config(self, **overrides: Any) -> EngineConfig:
        """The engine's knobs from these settings (the one mapping; ``overrides`` replace any)."""
        fields: dict[str, Any] = {
            "max_batch_size": self.max_batch_size,
            "max_delay_ms": self.max_delay_ms,
            "max_queue_size": self.max_queue_size,
            "decode_workers": self.decode_workers,
            "warmup": self.warmup,
            "drain_grace_s": self.drain_grace_s,
            "gpu_decode": self.gpu_decode,
            "limits": self.request_limits(),
            "max_queue_wait_ms": self.max_queue_wait_ms,
            "max_inflight_image_bytes": self.max_inflight_image_bytes,
            "max_boxes_per_job": self.max_boxes_per_job,
            "calibration_budget_s": self.calibration_budget_s,
        }
        return EngineConfig(**{**fields, **overrides})

    def request_limits(self) -> RequestLimits:
        """What one request may ask for, as the engine checks it."""
        return RequestLimits(max_boxes=self.max_boxes, min_box_size_px=self.min_box_size_px)

    def frontend_count(self) -> int:
        """``frontends``, or its default for the device: 1 on the CPU (the model competes with
        the front ends for the same few cores), min(4, CPUs / 4) with CUDA, counting the CPUs
        this process may use (``service.cpu_quota.usable_cpus``: a pod limited to 8 CPUs on a
        64-core node gets 2 front ends, not 4)."""
        if self.frontends is not None:
            return self.frontends
        if all(device == "cpu" for device in self.devices()):
            return 1
        return max(1, min(4, usable_cpus() // 4))

    def devices(self) -> list[str]:
        """The engine's devices, one worker each (``["cpu"]``, ``["cuda:0", "cuda:1"]``)."""
        return self.device.split(",")

    def cache_path(self) -> Path:
        """``cache_dir`` with ``~`` expanded."""
        return Path(self.cache_dir).expanduser()

    def public_dict(self) -> dict[str, Any]:
        """The settings for logs and ``/v1/models``: API keys replaced by their count."""
        data = self.model_dump(exclude={"api_keys"})
        data["api_keys"] = f"{len(self.api_keys)} configured"
        return data


def _check_environ(environ: Mapping[str, str], fields: set[str]) -> None:
    """Refuse ``POSE_*`` variables that name no field (case-insensitively, as pydantic reads them).

    Raises:
        UnknownSettingError: listing the unknown names and the closest known ones.
    """
    unknown = []
    for key in environ:
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or _SERVICE_LINK.match(upper):
            continue
        if upper in _CLIENT_VARIABLES:
            continue
        if upper[len(ENV_PREFIX) :].lower() not in fields:
            unknown.append(key)
    if unknown:
        names = [ENV_PREFIX + name.upper() for name in sorted(fields)]
        hints = []
        for key in sorted(unknown):
            close = difflib.get_close_matches(key.upper(), names, n=1)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise UnknownSettingError(
            f"unknown setting(s) in the environment: {', '.join(hints)}; known: {', '.join(names)}"
        )
