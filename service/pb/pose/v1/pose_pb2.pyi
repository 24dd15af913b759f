from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]
    PRECISION_BF16: _ClassVar[Precision]
    PRECISION_FP16: _ClassVar[Precision]
PRECISION_UNSPECIFIED: Precision
PRECISION_FP32: Precision
PRECISION_BF16: Precision
PRECISION_FP16: Precision

class Box(_message.Message):
    __slots__ = ("x", "y", "width", "height", "score")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    width: float
    height: float
    score: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., width: _Optional[float] = ..., height: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("width", "height", "rgb")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    RGB_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    rgb: bytes
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., rgb: _Optional[bytes] = ...) -> None: ...

class EstimateRequest(_message.Message):
    __slots__ = ("image", "boxes", "frame_id", "flip_test", "return_sigmas", "oks_nms", "swap_flip_scores", "precision", "raw", "track", "detect_every", "timestamp_ms", "smoothing")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    FLIP_TEST_FIELD_NUMBER: _ClassVar[int]
    RETURN_SIGMAS_FIELD_NUMBER: _ClassVar[int]
    OKS_NMS_FIELD_NUMBER: _ClassVar[int]
    SWAP_FLIP_SCORES_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    TRACK_FIELD_NUMBER: _ClassVar[int]
    DETECT_EVERY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    frame_id: str
    flip_test: bool
    return_sigmas: bool
    oks_nms: bool
    swap_flip_scores: bool
    precision: Precision
    raw: RawImage
    track: bool
    detect_every: int
    timestamp_ms: float
    smoothing: Smoothing
    def __init__(self, image: _Optional[bytes] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ..., frame_id: _Optional[str] = ..., flip_test: _Optional[bool] = ..., return_sigmas: _Optional[bool] = ..., oks_nms: _Optional[bool] = ..., swap_flip_scores: _Optional[bool] = ..., precision: _Optional[_Union[Precision, str]] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ..., track: _Optional[bool] = ..., detect_every: _Optional[int] = ..., timestamp_ms: _Optional[float] = ..., smoothing: _Optional[_Union[Smoothing, _Mapping]] = ...) -> None: ...

class Smoothing(_message.Message):
    __slots__ = ("min_cutoff", "beta", "d_cutoff", "fps")
    MIN_CUTOFF_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    D_CUTOFF_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    min_cutoff: float
    beta: float
    d_cutoff: float
    fps: float
    def __init__(self, min_cutoff: _Optional[float] = ..., beta: _Optional[float] = ..., d_cutoff: _Optional[float] = ..., fps: _Optional[float] = ...) -> None: ...

class Keypoint(_message.Message):
    __slots__ = ("x", "y", "score", "sigma_x", "sigma_y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SIGMA_X_FIELD_NUMBER: _ClassVar[int]
    SIGMA_Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    score: float
    sigma_x: float
    sigma_y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., score: _Optional[float] = ..., sigma_x: _Optional[float] = ..., sigma_y: _Optional[float] = ...) -> None: ...

class Person(_message.Message):
    __slots__ = ("box", "score", "keypoints", "track_id")
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    TRACK_ID_FIELD_NUMBER: _ClassVar[int]
    box: Box
    score: float
    keypoints: _containers.RepeatedCompositeFieldContainer[Keypoint]
    track_id: int
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., score: _Optional[float] = ..., keypoints: _Optional[_Iterable[_Union[Keypoint, _Mapping]]] = ..., track_id: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "grpc_code", "retry_after_s")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    GRPC_CODE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    grpc_code: int
    retry_after_s: float
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., grpc_code: _Optional[int] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class EstimateResponse(_message.Message):
    __slots__ = ("frame_id", "persons", "width", "height", "timing_ms", "error", "index", "detector_ran")
    class TimingMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    PERSONS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMING_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_RAN_FIELD_NUMBER: _ClassVar[int]
    frame_id: str
    persons: _containers.RepeatedCompositeFieldContainer[Person]
    width: int
    height: int
    timing_ms: _containers.ScalarMap[str, float]
    error: Error
    index: int
    detector_ran: bool
    def __init__(self, frame_id: _Optional[str] = ..., persons: _Optional[_Iterable[_Union[Person, _Mapping]]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., timing_ms: _Optional[_Mapping[str, float]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., index: _Optional[int] = ..., detector_ran: _Optional[bool] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Edge(_message.Message):
    __slots__ = ("a", "b")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    a: int
    b: int
    def __init__(self, a: _Optional[int] = ..., b: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "weights_sha256", "input_width", "input_height", "keypoint_names", "skeleton", "detector", "devices", "default_flip_test", "default_precision", "stream_window", "max_boxes", "max_message_bytes", "max_image_pixels", "details")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    KEYPOINT_NAMES_FIELD_NUMBER: _ClassVar[int]
    SKELETON_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FLIP_TEST_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRECISION_FIELD_NUMBER: _ClassVar[int]
    STREAM_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MAX_BOXES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights_sha256: str
    input_width: int
    input_height: int
    keypoint_names: _containers.RepeatedScalarFieldContainer[str]
    skeleton: _containers.RepeatedCompositeFieldContainer[Edge]
    detector: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    default_flip_test: bool
    default_precision: str
    stream_window: int
    max_boxes: int
    max_message_bytes: int
    max_image_pixels: int
    details: _struct_pb2.Struct
    def __init__(self, model: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., input_width: _Optional[int] = ..., input_height: _Optional[int] = ..., keypoint_names: _Optional[_Iterable[str]] = ..., skeleton: _Optional[_Iterable[_Union[Edge, _Mapping]]] = ..., detector: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., default_flip_test: _Optional[bool] = ..., default_precision: _Optional[str] = ..., stream_window: _Optional[int] = ..., max_boxes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
