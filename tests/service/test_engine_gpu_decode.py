"""JPEG decoding on the workers' device (``EngineConfig.gpu_decode``), with the CPU pool as before
for everything that does not qualify.

No GPU here: the route is forced onto CPU workers by handing the engine an explicit
``device_decoder`` (``service.gpu_decode.decode_jpegs``, which decodes on the CPU with torchvision's
libjpeg-turbo), so every step but nvJPEG itself runs: the header probe in the pool, JPEGs queued
encoded, one batched decoder call in the worker before ``pipeline.run``, splitting on failure and
the CPU decoder's verdict on a file refused alone. The ``cuda`` tests run the real nvJPEG route.

Decoder difference: torchvision's libjpeg-turbo (3.1.3 in torchvision 0.29.1) and Pillow's (3.2.0
in Pillow 13.0) decode every file here bit for bit alike (max abs difference 0,
``CPU_MAX_ABS_DIFF``), so the real pipeline's answers through the forced route equal batch-1
answers on ``decode_image``'s tensors to the batching tolerance of ``test_engine_real.py``
(1e-3 px, 1e-4 score). nvJPEG decodes differently (its IDCT and chroma upsampling): torchvision's
own test bounds its mean absolute difference to libjpeg-turbo by 2 levels, and the cuda tests use
that bound (not yet run on a GPU).
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from model import create_model
from model.interfaces import BatchStats, ImageResult, ModelDescription, PipelineItem, PoseOptions
from model.pipeline import TopDownPipeline
from service.engine import DeadlineExceededError, Engine, EngineConfig, PoseRequest, PoseResponse
from service.errors import ImageError
from service.gpu_decode import decode_jpegs, probe_image, sample_jpeg
from service.settings import Settings
from service.uploads import decode_image
from service.workers import is_oom, plan_decoding
from tests.service.descriptions import fake_description
from tests.service.test_engine_real import assert_same

pytestmark = pytest.mark.filterwarnings(
    # torchvision 0.29 deprecates torchvision.io's decoders (for TorchCodec); 0.26 does not.
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

ASSET = Path(__file__).parents[1] / "assets" / "000000000785.jpg"  # COCO val2017 785, 640x425
MAX_PIXELS = 10_000_000
CPU_MAX_ABS_DIFF = 0  # torchvision's libjpeg-turbo vs Pillow's, measured on every file below
CUDA_MAX_MEAN_ABS_DIFF = 2.0  # nvJPEG vs libjpeg-turbo: torchvision's test_decode_jpegs_cuda bound
WAIT_S = 30.0


def photo(width: int, height: int) -> Image.Image:
    """A real photograph cropped to ``width`` x ``height`` (sizes tell the uploads apart)."""
    with Image.open(ASSET) as source:
        return source.convert("RGB").crop((0, 0, width, height))


def encode(image: Image.Image, fmt: str = "JPEG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    if options.get("progressive"):
        options["bufsize"] = 4 * image.width * image.height  # Pillow's guess can be too small
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def corrupt_jpeg() -> bytes:
    """A JPEG with an intact header and EOI but a broken Huffman table: the probe lets it
    through, and both libjpeg-turbo and Pillow refuse it."""
    data = bytearray(encode(photo(207, 157), quality=90))
    dht = data.index(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16  # code counts far beyond what 16 bits can hold
    return bytes(data)


def oversized_jpeg(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims ``width`` x ``height`` (a decompression bomb)."""
    data = bytearray(encode(photo(32, 24), quality=80))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


# Uploads that qualify for the device (distinct sizes), and those that do not.
QUALIFYING = {
    "baseline_420": lambda: encode(photo(200, 150), quality=90),
    "baseline_444": lambda: encode(photo(201, 151), quality=90, subsampling=0),
    "baseline_422": lambda: encode(photo(202, 152), quality=90, subsampling=1),
    "progressive": lambda: encode(photo(203, 153), quality=85, progressive=True),
    "grayscale": lambda: encode(photo(204, 154).convert("L"), quality=90),
    "exif_upright": lambda: encode(photo(205, 155), exif=exif_orientation(1)),
    "restart_markers": lambda: encode(photo(206, 156), restart_marker_blocks=4),
}
NOT_QUALIFYING = {
    "png": lambda: encode(photo(210, 160), "PNG"),
    "cmyk_jpeg": lambda: encode(photo(211, 161).convert("CMYK"), quality=90),
    "exif_rotated_jpeg": lambda: encode(photo(212, 162), exif=exif_orientation(6)),
    "rgb_coded_jpeg": lambda: encode(photo(213, 163), keep_rgb=True),
    "webp": lambda: encode(photo(214, 164), "WEBP"),
}


class RecordingPipeline:
    """Answers each image with its size (no persons) and keeps a CPU copy of what it was given."""

    def __init__(self, device: str, gate: threading.Event | None = None) -> None:
        self.device = torch.device(device)
        self.gate = gate
        self.lock = threading.Lock()
        self.batches: list[list[torch.Tensor]] = []
        self.devices: list[torch.device] = []

    def warmup(self) -> None:
        pass

    def describe(self) -> ModelDescription:
        return fake_description("recording")

    def run(self, items: list[PipelineItem]) -> tuple[list[ImageResult], BatchStats]:
        with self.lock:
            self.batches.append([item.image.detach().to("cpu") for item in items])
            self.devices.extend(item.image.device for item in items)
        if self.gate is not None:
            assert self.gate.wait(WAIT_S)
        results = [
            ImageResult(width=int(i.image.shape[2]), height=int(i.image.shape[1]), persons=[])
            for i in items
        ]
        return results, BatchStats(detect_images=len(items), persons_per_image=[0] * len(items))

    def seen(self) -> dict[tuple[int, int], torch.Tensor]:
        """Every image given, by (width, height)."""
        return {(int(t.shape[2]), int(t.shape[1])): t for batch in self.batches for t in batch}


class RecordingDeviceDecoder:
    """``decode_jpegs`` (on the CPU here) recording each call; can refuse files or fake an OOM."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[int] = []  # files per call
        self.refuse: set[bytes] = set()  # a call holding one of these raises RuntimeError
        self.oom_above: int | None = None  # a call with more files raises CUDA OOM
        self.decoded: list[bytes] = []
        self.gate: threading.Event | None = None  # when set, calls block until it is set
        self.entered = threading.Semaphore(0)

    def __call__(self, datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        files = [bytes(d.numpy()) for d in datas]
        with self.lock:
            self.calls.append(len(files))
        self.entered.release()
        if self.gate is not None:
            assert self.gate.wait(WAIT_S)
        if self.oom_above is not None and len(files) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        if self.refuse & set(files):
            raise RuntimeError("nvjpegDecode failed (fake)")
        images = decode_jpegs(datas, device)
        with self.lock:
            self.decoded.extend(files)
        return images


class RecordingDecoder:
    """``decode_image`` recording what it was asked to decode (the CPU route)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decoded: list[bytes] = []

    def __call__(self, data: bytes) -> torch.Tensor:
        with self.lock:
            self.decoded.append(data)
        return decode_image(data, max_pixels=MAX_PIXELS)


@pytest.fixture(name="engines")
async def engines_fixture() -> AsyncIterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for engine in made:
        await engine.stop(grace_s=WAIT_S)


async def forced_engine(
    engines: list[Engine],
    pipeline: RecordingPipeline,
    device_decoder: RecordingDeviceDecoder,
    decoder: RecordingDecoder,
    batch: int,
    **config: Any,
) -> Engine:
    """An engine on a CPU worker with the device-decode route forced on; batches of ``batch``."""
    engine = Engine(
        lambda device: pipeline,
        ["cpu"],
        EngineConfig(
            **{
                "max_batch_size": batch,
                "max_delay_ms": 600_000.0,  # batches fill: the test is about routes, not timing
                "gpu_decode": True,
                "warmup": False,
                **config,
            }
        ),
        decoder=decoder,
        probe=partial(probe_image, max_pixels=MAX_PIXELS),
        device_decoder=device_decoder,
    )
    engines.append(engine)
    await engine.start()
    assert engine.decodes_on_device
    return engine


async def infer_all(engine: Engine, uploads: list[bytes]) -> list[PoseResponse | BaseException]:
    return await asyncio.gather(
        *(engine.infer(PoseRequest(image=data)) for data in uploads), return_exceptions=True
    )


# --- the probe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(QUALIFYING))
def test_probe_qualifies_jpegs_the_device_decodes_as_the_cpu(name: str) -> None:
    data = QUALIFYING[name]()
    header = probe_image(data, max_pixels=MAX_PIXELS)
    assert header.device_decodable and header.format == "jpeg"
    expected = decode_image(data, max_pixels=MAX_PIXELS)
    assert (header.height, header.width) == tuple(expected.shape[1:])
    (decoded,) = decode_jpegs(
        [torch.frombuffer(bytearray(data), dtype=torch.uint8)], torch.device("cpu")
    )
    assert decoded.shape == expected.shape and decoded.dtype == torch.uint8
    diff = (decoded.int() - expected.int()).abs().max().item()
    assert diff <= CPU_MAX_ABS_DIFF, f"{name}: libjpeg-turbo vs Pillow differ by {diff}"


@pytest.mark.parametrize("name", sorted(NOT_QUALIFYING))
def test_probe_sends_everything_else_to_the_cpu(name: str) -> None:
    header = probe_image(NOT_QUALIFYING[name](), max_pixels=MAX_PIXELS)
    assert not header.device_decodable


def test_probe_sends_a_truncated_jpeg_to_the_cpu() -> None:
    truncated = QUALIFYING["baseline_420"]()[:-300]  # no EOI: nvJPEG might not notice
    assert not probe_image(truncated, max_pixels=MAX_PIXELS).device_decodable
    with pytest.raises(ImageError, match="truncated"):
        decode_image(truncated, max_pixels=MAX_PIXELS)


def test_probe_reads_mode_and_orientation() -> None:
    cmyk = probe_image(NOT_QUALIFYING["cmyk_jpeg"](), max_pixels=MAX_PIXELS)
    rotated = probe_image(NOT_QUALIFYING["exif_rotated_jpeg"](), max_pixels=MAX_PIXELS)
    gray = probe_image(QUALIFYING["grayscale"](), max_pixels=MAX_PIXELS)
    assert (cmyk.mode, cmyk.orientation) == ("CMYK", None)
    assert (rotated.mode, rotated.orientation, rotated.width, rotated.height) == (
        "RGB",
        6,
        212,
        162,
    )
    assert (gray.mode, gray.orientation) == ("L", None)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"\x00\x01\x02garbage" * 8,
        b"\xff\xd8\xff\xe0" + b"\x00" * 40,  # a JPEG signature and no header
        oversized_jpeg(20_000, 20_000),
    ],
    ids=["empty", "svg", "garbage", "broken_header", "bomb"],
)
def test_probe_refuses_what_decode_image_refuses_with_the_same_code(data: bytes) -> None:
    with pytest.raises(ImageError) as probed:
        probe_image(data, max_pixels=MAX_PIXELS)
    with pytest.raises(ImageError) as decoded:
        decode_image(data, max_pixels=MAX_PIXELS)
    assert (probed.value.code, probed.value.status) == (decoded.value.code, decoded.value.status)


def test_sample_jpeg_qualifies() -> None:
    assert probe_image(sample_jpeg(), max_pixels=MAX_PIXELS).device_decodable


# --- which route serves ---------------------------------------------------------------------------


def test_gpu_decode_has_no_effect_unless_every_worker_is_on_one_cuda_device() -> None:
    def plan(*devices: str) -> bool:
        return (
            plan_decoding(
                devices,
                gpu_decode=True,
                decoder=partial(decode_image, max_pixels=MAX_PIXELS),
                probe=partial(probe_image, max_pixels=MAX_PIXELS),
                device_decoder=None,
                warmup=False,
            )
            is not None
        )

    assert plan("cuda") and plan("cuda:0") and plan("cuda:1", "cuda:1") and plan("cuda", "cuda:0")
    assert not plan("cpu") and not plan("cpu", "cuda") and not plan("cuda:0", "cuda:1")
    with pytest.raises(ValueError, match="probe"):
        Engine(lambda d: RecordingPipeline(d), ["cuda"], EngineConfig(gpu_decode=True))


def test_setting_defaults_off_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POSE_GPU_DECODE", raising=False)
    assert Settings().gpu_decode is False  # type: ignore[call-arg]
    monkeypatch.setenv("POSE_GPU_DECODE", "true")
    assert Settings().gpu_decode is True  # type: ignore[call-arg]


async def test_cpu_workers_keep_the_cpu_pool(engines: list[Engine]) -> None:
    pipeline, decoder = RecordingPipeline("cpu"), RecordingDecoder()
    engine = Engine(
        lambda device: pipeline,
        ["cpu"],
        EngineConfig(max_delay_ms=0.0, gpu_decode=True),
        decoder=decoder,
        probe=partial(probe_image, max_pixels=MAX_PIXELS),
    )
    engines.append(engine)
    await engine.start()
    assert not engine.decodes_on_device
    data = QUALIFYING["baseline_420"]()
    response = await engine.infer(PoseRequest(image=data))
    assert (response.result.width, response.result.height) == (200, 150)
    assert decoder.decoded == [data]


async def test_qualifying_jpegs_take_the_device_route_and_others_the_cpu(
    engines: list[Engine],
) -> None:
    pipeline, device_decoder, decoder = (
        RecordingPipeline("cpu"),
        RecordingDeviceDecoder(),
        RecordingDecoder(),
    )
    uploads = {name: make() for name, make in {**QUALIFYING, **NOT_QUALIFYING}.items()}
    engine = await forced_engine(engines, pipeline, device_decoder, decoder, batch=len(uploads))

    responses = await infer_all(engine, list(uploads.values()))

    assert all(isinstance(r, PoseResponse) for r in responses), responses
    # One batch: every qualifying JPEG in one device-decoder call just before the pipeline.
    assert len(pipeline.batches) == 1 and len(pipeline.batches[0]) == len(uploads)
    assert device_decoder.calls == [len(QUALIFYING)]
    assert sorted(device_decoder.decoded) == sorted(uploads[n] for n in QUALIFYING)
    assert sorted(decoder.decoded) == sorted(uploads[n] for n in NOT_QUALIFYING)
    # The pipeline got what the CPU route gives, to the decoder difference.
    seen = pipeline.seen()
    for name, data in uploads.items():
        expected = decode_image(data, max_pixels=MAX_PIXELS)
        got = seen[(int(expected.shape[2]), int(expected.shape[1]))]
        assert got.shape == expected.shape, name
        assert (got.int() - expected.int()).abs().max().item() <= CPU_MAX_ABS_DIFF, name
    assert seen[(162, 212)].shape == (3, 212, 162)  # the EXIF-rotated one, turned upright
    for response in responses:
        assert isinstance(response, PoseResponse)
        assert set(response.timing_ms) == {"queue", "decode", "detect", "pose", "total"}


async def test_warmup_decodes_a_jpeg_on_the_device_before_ready(engines: list[Engine]) -> None:
    device_decoder = RecordingDeviceDecoder()
    await forced_engine(
        engines, RecordingPipeline("cpu"), device_decoder, RecordingDecoder(), 1, warmup=True
    )
    assert device_decoder.calls == [1] and device_decoder.decoded == [sample_jpeg()]


async def test_corrupt_jpeg_fails_alone_and_its_batchmates_succeed(engines: list[Engine]) -> None:
    pipeline, device_decoder, decoder = (
        RecordingPipeline("cpu"),
        RecordingDeviceDecoder(),
        RecordingDecoder(),
    )
    good = [QUALIFYING[n]() for n in ("baseline_420", "progressive", "grayscale")]
    corrupt = corrupt_jpeg()
    assert probe_image(corrupt, max_pixels=MAX_PIXELS).device_decodable
    uploads = [good[0], corrupt, *good[1:]]
    engine = await forced_engine(engines, pipeline, device_decoder, decoder, batch=len(uploads))

    responses = await infer_all(engine, uploads)

    bad = responses[1]
    assert isinstance(bad, ImageError) and (bad.code, bad.status.http) == ("bad_image", 400)
    assert all(isinstance(responses[i], PoseResponse) for i in (0, 2, 3)), responses
    assert device_decoder.calls[0] == len(uploads)  # one call, then halves to find the culprit
    assert sorted(device_decoder.decoded) == sorted(good)
    assert decoder.decoded == [corrupt]  # the CPU decoder's verdict, on that file alone
    assert [len(batch) for batch in pipeline.batches] == [len(good)]


async def test_a_file_the_device_refuses_is_decoded_on_the_cpu(engines: list[Engine]) -> None:
    pipeline, device_decoder, decoder = (
        RecordingPipeline("cpu"),
        RecordingDeviceDecoder(),
        RecordingDecoder(),
    )
    uploads = [QUALIFYING[n]() for n in ("baseline_420", "baseline_422", "progressive")]
    device_decoder.refuse = {uploads[1]}  # e.g. a subsampling nvJPEG does not know
    engine = await forced_engine(engines, pipeline, device_decoder, decoder, batch=len(uploads))

    responses = await infer_all(engine, uploads)

    assert all(isinstance(r, PoseResponse) for r in responses), responses
    assert decoder.decoded == [uploads[1]]
    expected = decode_image(uploads[1], max_pixels=MAX_PIXELS)
    assert torch.equal(pipeline.seen()[(202, 152)], expected)


async def test_oom_while_decoding_splits_the_batch(engines: list[Engine]) -> None:
    pipeline, device_decoder, decoder = (
        RecordingPipeline("cpu"),
        RecordingDeviceDecoder(),
        RecordingDecoder(),
    )
    uploads = [make() for make in QUALIFYING.values()][:4]
    device_decoder.oom_above = 1
    engine = await forced_engine(engines, pipeline, device_decoder, decoder, batch=len(uploads))

    responses = await infer_all(engine, uploads)

    assert all(isinstance(r, PoseResponse) for r in responses), responses
    assert device_decoder.calls == [4, 2, 1, 1, 2, 1, 1]
    assert decoder.decoded == []  # halves fit: nothing fell back to the CPU
    assert [len(batch) for batch in pipeline.batches] == [4]


async def test_pixel_limit_is_refused_before_any_decoding(engines: list[Engine]) -> None:
    pipeline, device_decoder, decoder = (
        RecordingPipeline("cpu"),
        RecordingDeviceDecoder(),
        RecordingDecoder(),
    )
    engine = await forced_engine(engines, pipeline, device_decoder, decoder, batch=1)

    with pytest.raises(ImageError) as refused:
        await engine.infer(PoseRequest(image=oversized_jpeg(4000, 3000)))  # 12 MP > 10 MP

    assert (refused.value.code, refused.value.status.http) == ("too_many_pixels", 413)
    assert device_decoder.calls == [] and decoder.decoded == [] and pipeline.batches == []


async def test_job_cancelled_while_its_batch_decodes_never_runs(engines: list[Engine]) -> None:
    pipeline, device_decoder, decoder = (
        RecordingPipeline("cpu"),
        RecordingDeviceDecoder(),
        RecordingDecoder(),
    )
    device_decoder.gate = threading.Event()
    engine = await forced_engine(engines, pipeline, device_decoder, decoder, batch=1)
    doomed = asyncio.create_task(engine.infer(PoseRequest(image=QUALIFYING["baseline_420"]())))
    assert await asyncio.to_thread(device_decoder.entered.acquire, timeout=WAIT_S)  # decoding it
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    device_decoder.gate.set()
    response = await engine.infer(PoseRequest(image=QUALIFYING["progressive"]()))
    assert (response.result.width, response.result.height) == (203, 153)
    assert [[tuple(t.shape) for t in batch] for batch in pipeline.batches] == [[(3, 153, 203)]]


async def test_deadline_passing_while_decoding_answers_an_error_and_never_runs(
    engines: list[Engine],
) -> None:
    pipeline, device_decoder, decoder = (
        RecordingPipeline("cpu"),
        RecordingDeviceDecoder(),
        RecordingDecoder(),
    )
    device_decoder.gate = threading.Event()
    engine = await forced_engine(engines, pipeline, device_decoder, decoder, batch=1)
    task = asyncio.create_task(
        engine.infer(
            PoseRequest(image=QUALIFYING["baseline_420"](), deadline=time.monotonic() + 0.5)
        )
    )
    assert await asyncio.to_thread(device_decoder.entered.acquire, timeout=WAIT_S)  # decoding it
    with pytest.raises(DeadlineExceededError):
        await task  # while the worker is still inside the device decoder
    device_decoder.gate.set()
    await engine.infer(PoseRequest(image=QUALIFYING["progressive"]()))
    assert [len(batch) for batch in pipeline.batches] == [1]


# --- the real pipeline ---------------------------------------------------------------------------


async def test_real_pipeline_answers_equal_cpu_decoded_answers(
    distilpose_s_checkpoint: Path, engines: list[Engine]
) -> None:
    torch.manual_seed(0)

    def factory(device: str) -> TopDownPipeline:
        net = create_model("distilpose_s", weights=distilpose_s_checkpoint, device=device)
        return TopDownPipeline(net, detector=None, device=device)

    names = ["baseline_420", "progressive", "grayscale", "cmyk_jpeg"]
    makers = {**QUALIFYING, **NOT_QUALIFYING}
    uploads = [makers[name]() for name in names]
    boxes = torch.tensor([[20.0, 10.0, 120.0, 130.0, 0.9]])  # (1, 5) x, y, w, h, score
    options = PoseOptions(flip_test=True)
    reference = factory("cpu")
    with torch.inference_mode():
        singles = [
            reference.run(
                [
                    PipelineItem(
                        image=decode_image(data, max_pixels=MAX_PIXELS),
                        boxes=boxes,
                        options=options,
                    )
                ]
            )[0][0]
            for data in uploads
        ]

    device_decoder = RecordingDeviceDecoder()
    engine = Engine(
        factory,
        ["cpu"],
        EngineConfig(
            max_batch_size=len(uploads),
            max_delay_ms=600_000.0,
            gpu_decode=True,
            calibration_budget_s=0,  # one batch of them all, not the CPU's preferred size
        ),
        decoder=partial(decode_image, max_pixels=MAX_PIXELS),
        probe=partial(probe_image, max_pixels=MAX_PIXELS),
        device_decoder=device_decoder,
    )
    engines.append(engine)
    await engine.start()
    responses = await asyncio.gather(
        *(engine.infer(PoseRequest(image=d, boxes=boxes, options=options)) for d in uploads)
    )

    assert device_decoder.calls == [1, 3]  # warm-up, then the 3 qualifying JPEGs
    for response, single in zip(responses, singles, strict=True):
        assert_same(response.result, single, 1e-3, 1e-4)


# --- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(QUALIFYING))
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_decodes_like_the_cpu(name: str) -> None:
    data = QUALIFYING[name]()
    (decoded,) = decode_jpegs(
        [torch.frombuffer(bytearray(data), dtype=torch.uint8)], torch.device("cuda", 0)
    )
    expected = decode_image(data, max_pixels=MAX_PIXELS)
    assert decoded.device.type == "cuda" and decoded.shape == expected.shape
    mean = (decoded.cpu().float() - expected.float()).abs().mean().item()
    assert mean < CUDA_MAX_MEAN_ABS_DIFF, name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_cuda_route_end_to_end(engines: list[Engine]) -> None:
    pipeline, decoder = RecordingPipeline("cuda"), RecordingDecoder()
    uploads = {name: make() for name, make in {**QUALIFYING, **NOT_QUALIFYING}.items()}
    uploads["corrupt"] = corrupt_jpeg()
    engine = Engine(
        lambda device: pipeline,
        ["cuda"],
        EngineConfig(
            max_batch_size=len(uploads),
            max_delay_ms=600_000.0,
            gpu_decode=True,
            calibration_budget_s=0,  # one batch of them all, not the CPU's preferred size
        ),
        decoder=decoder,
        probe=partial(probe_image, max_pixels=MAX_PIXELS),
    )
    engines.append(engine)
    await engine.start()
    assert engine.decodes_on_device

    responses = dict(zip(uploads, await infer_all(engine, list(uploads.values())), strict=True))

    bad = responses.pop("corrupt")
    assert isinstance(bad, ImageError) and bad.code == "bad_image"
    assert all(isinstance(r, PoseResponse) for r in responses.values()), responses
    assert sorted(decoder.decoded) == sorted(
        [*(uploads[n] for n in NOT_QUALIFYING), uploads["corrupt"]]
    )
    seen = pipeline.seen()
    for name in QUALIFYING:
        expected = decode_image(uploads[name], max_pixels=MAX_PIXELS)
        got = seen[(int(expected.shape[2]), int(expected.shape[1]))]
        assert got.shape == expected.shape
        assert (got.float() - expected.float()).abs().mean().item() < CUDA_MAX_MEAN_ABS_DIFF, name
    assert sum(d.type == "cuda" for d in pipeline.devices) == len(QUALIFYING)


@pytest.mark.parametrize(
    ("message", "oom"),
    [
        ("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total capacity)", True),
        ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported", True),
        ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
        ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
        ("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED", True),
        # torchvision's nvJPEG checks end with nvJPEG's status: 5 is ALLOCATOR_FAILURE
        ("Failed to attach device buffer: 5", True),
        ("Failed to decode jpeg stream: 5", True),
        ("Failed to decode jpeg stream: 3", False),  # BAD_JPEG: the file, not the memory
        ("Failed to decode jpeg stream: 55", False),
        ("nvjpegDecode failed (fake)", False),
        ("CUDA error: an illegal memory access was encountered", False),
        ("pipeline returned 1 results for 2", False),
    ],
)
def test_is_oom_knows_each_device_library_s_out_of_memory(message: str, oom: bool) -> None:
    """An allocation failure splits a batch (``WorkerPool._execute``) and empties torch's cache
    before a device decoder's halves run; any other failure fails the batch's jobs."""
    assert is_oom(RuntimeError(message)) is oom
    assert is_oom(torch.cuda.OutOfMemoryError("anything"))
    assert not is_oom(ValueError(message))
