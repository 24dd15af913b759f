"""JPEG decode benchmark: images/s on CPU (PIL, ``torchvision.io.decode_jpeg``, the service's own
decoder) with 1..N threads, and on CUDA (``decode_jpeg(device="cuda")``, batched).

    python -m bench.decode                               # CPU
    python -m bench.decode --device cuda --batch-sizes 1 32 128
"""

from __future__ import annotations

import argparse
import functools
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from bench.common import (
    add_common_args,
    apply_threads,
    dump_json_line,
    environment,
    summarize_ms,
    synthetic_jpeg,
    time_repeats,
    write_result,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--images", type=int, default=64, help="distinct JPEGs per timed round")
    p.add_argument(
        "--workers", type=int, nargs="+", default=None, help="CPU thread counts (default 1, ncpu)"
    )
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 32, 128], help="GPU decode batches"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=5.0)
    return p.parse_args(argv)


def pil_decode(data: bytes) -> torch.Tensor:
    """PIL decode to a (3, H, W) uint8 RGB tensor (what a naive server does)."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def tv_decode(data: bytes) -> torch.Tensor:
    """``torchvision.io.decode_jpeg`` on CPU: (3, H, W) uint8."""
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def service_decoder() -> Callable[[bytes], torch.Tensor] | None:
    """The service's upload decoder (sniffing, pixel limit, EXIF, mode conversion), if present."""
    try:
        from service.uploads import decode_image
    except ImportError:
        return None
    return functools.partial(decode_image, max_pixels=40_000_000)


def _cpu_rows(args: argparse.Namespace, blobs: list[bytes]) -> list[dict[str, Any]]:
    decoders: dict[str, Callable[[bytes], Any]] = {"pil": pil_decode, "torchvision_cpu": tv_decode}
    svc = service_decoder()
    if svc is not None:
        decoders["service_images"] = svc
    workers_list = args.workers or sorted({1, max(1, torch.get_num_threads())})
    rows = []
    for name, fn in decoders.items():
        for workers in workers_list:
            pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None

            def round_(fn: Callable[[bytes], Any] = fn, pool: ThreadPoolExecutor | None = pool):
                if pool is None:
                    for b in blobs:
                        fn(b)
                else:
                    list(pool.map(fn, blobs))

            samples = time_repeats(
                round_,
                device="cpu",
                warmup=args.warmup,
                repeats=args.repeats,
                max_seconds=args.max_seconds,
            )
            if pool is not None:
                pool.shutdown()
            stats = summarize_ms(samples)
            row = {
                "decoder": name,
                "device": "cpu",
                "workers": workers,
                "batch": len(blobs),
                **stats,
                "images_per_s": len(blobs) / (stats["median_ms"] / 1000.0),
                "ms_per_image": stats["median_ms"] / len(blobs),
            }
            rows.append(row)
            dump_json_line(row)
    return rows


def _cuda_rows(args: argparse.Namespace, blobs: list[bytes]) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    rows = []
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    for batch in args.batch_sizes:
        chunk = [datas[i % len(datas)] for i in range(batch)]

        def call(chunk: list[torch.Tensor] = chunk) -> Any:
            return decode_jpeg(chunk, device=device)

        try:
            samples = time_repeats(
                call,
                device=device,
                warmup=max(1, args.warmup),
                repeats=args.repeats,
                max_seconds=args.max_seconds,
            )
        except RuntimeError as exc:
            rows.append(
                {
                    "decoder": "torchvision_cuda",
                    "batch": batch,
                    "status": "error",
                    "error": str(exc)[:500],
                }
            )
            continue
        stats = summarize_ms(samples)
        row = {
            "decoder": "torchvision_cuda",
            "device": str(device),
            "workers": 1,
            "batch": batch,
            **stats,
            "images_per_s": batch / (stats["median_ms"] / 1000.0),
            "ms_per_image": stats["median_ms"] / batch,
        }
        rows.append(row)
        dump_json_line(row)
    return rows


def run(args: argparse.Namespace) -> Path:
    """Measure and write the JSON result file; returns its path."""
    apply_threads(args.threads)
    env = environment(args.device)
    blobs = [
        synthetic_jpeg(args.width, args.height, seed=i, quality=args.quality)
        for i in range(args.images)
    ]
    rows = _cpu_rows(args, blobs)
    skipped = []
    if torch.device(args.device).type == "cuda":
        rows += _cuda_rows(args, blobs)
    else:
        skipped.append({"decoder": "torchvision_cuda", "reason": "no CUDA device"})
    return write_result(
        "decode",
        args.device,
        args,
        rows,
        out_dir=args.out_dir,
        env=env,
        extra={
            "skipped": skipped,
            "image": {
                "width": args.width,
                "height": args.height,
                "quality": args.quality,
                "mean_bytes": sum(map(len, blobs)) / len(blobs),
            },
        },
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m bench.decode``."""
    dump_json_line({"written": str(run(parse_args(argv)))})


if __name__ == "__main__":
    main()
