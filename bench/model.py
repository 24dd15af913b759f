"""Model benchmark: crops/s and latency vs batch size for DistilPose-S and -L.

Sweeps batch size x precision (fp32; bf16 / fp16 autocast on CUDA only) x execution mode (eager,
``torch.compile``, CUDA graphs for small batches on CUDA) x flip test (off: one forward of B crops;
on: one forward of 2B crops, the crops and their mirror images, as the pipeline's flip test does).
Weights are random: the cost of a forward does not depend on the values.

    python -m bench.model                          # CPU sweep (batch 1..64), eager
    python -m bench.model --device cuda --compile both --cuda-graphs
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    add_common_args,
    apply_threads,
    dump_json_line,
    environment,
    summarize_ms,
    synchronize,
    time_repeats,
    write_result,
)

CPU_BATCHES = [1, 2, 4, 8, 16, 32, 64]
CUDA_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--models", nargs="+", default=["distilpose_s", "distilpose_l"])
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="default: 1..64 CPU, 1..1024 CUDA"
    )
    p.add_argument("--max-batch-l", type=int, default=None, help="cap the sweep for distilpose_l")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    p.add_argument("--flip", choices=["off", "on", "both"], default="both")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode")
    p.add_argument(
        "--compile-batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes to compile (each recompiles; default: all)",
    )
    p.add_argument("--cuda-graphs", action="store_true", help="also CUDA-graph small batches")
    p.add_argument("--cuda-graph-max-batch", type=int, default=64)
    p.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 (off: golden parity)")
    p.add_argument("--cudnn-benchmark", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=5.0, help="timed seconds per config cap")
    return p.parse_args(argv)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    # cache_enabled=False: required for CUDA-graph capture, harmless otherwise.
    return torch.autocast(device.type, dtype=DTYPES[precision], cache_enabled=False)


def _forward_fn(net: Callable[[torch.Tensor], Any], flip: bool) -> Callable[[torch.Tensor], Any]:
    def fwd(x: torch.Tensor) -> Any:
        # x: (B, 3, H, W) normalised crops; flip test runs (2B, 3, H, W) in one forward.
        if flip:
            x = torch.cat([x, x.flip(3)], dim=0)
        return net(x)

    return fwd


def _cuda_graph_fn(
    fwd: Callable[[torch.Tensor], Any], x: torch.Tensor, device: torch.device, precision: str
) -> Callable[[], Any]:
    """Capture ``fwd(static_x)`` in a CUDA graph and return a replay closure."""
    static_x = x.clone()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), _autocast(device, precision):
        for _ in range(3):  # warm up on a side stream before capture, as the docs ask
            fwd(static_x)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), _autocast(device, precision):
        fwd(static_x)

    def replay() -> None:
        static_x.copy_(x)
        graph.replay()

    return replay


def _modes(args: argparse.Namespace, device: torch.device) -> list[str]:
    modes = []
    if args.compile in ("off", "both"):
        modes.append("eager")
    if args.compile in ("on", "both"):
        modes.append("compile")
    if args.cuda_graphs and device.type == "cuda":
        modes.append("cuda_graph")
    return modes


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure_one(
    net: Any,
    *,
    model_name: str,
    batch: int,
    precision: str,
    mode: str,
    flip: bool,
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Time one configuration; returns a result row (status "ok", "oom" or "error")."""
    w, h = net.info.input_size
    row: dict[str, Any] = {
        "model": model_name,
        "batch": batch,
        "forward_batch": 2 * batch if flip else batch,
        "precision": precision,
        "mode": mode,
        "flip": flip,
    }
    x = torch.randn(batch, 3, h, w, device=device)  # (B, 3, H, W) normalised crops
    compile_s = None
    try:
        if mode == "compile":
            torch._dynamo.reset()
            compiled = torch.compile(net, mode=args.compile_mode, dynamic=False)
            fwd = _forward_fn(compiled, flip)
            t0 = time.perf_counter()
            with _autocast(device, precision):
                fwd(x)
            synchronize(device)
            compile_s = time.perf_counter() - t0

            def call() -> Any:
                with _autocast(device, precision):
                    return fwd(x)

        elif mode == "cuda_graph":
            call = _cuda_graph_fn(_forward_fn(net, flip), x, device, precision)
        else:
            fwd = _forward_fn(net, flip)

            def call() -> Any:
                with _autocast(device, precision):
                    return fwd(x)

        samples = time_repeats(
            call,
            device=device,
            warmup=args.warmup,
            repeats=args.repeats,
            max_seconds=args.max_seconds,
            min_repeats=args.min_repeats,
        )
    except Exception as exc:  # an OOM or a compile failure is a result, not a crash
        row["status"] = "oom" if _is_oom(exc) else "error"
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row
    stats = summarize_ms(samples)
    row.update(stats)
    row["status"] = "ok"
    row["compile_s"] = compile_s
    row["crops_per_s"] = batch / (stats["median_ms"] / 1000.0) if stats["median_ms"] else 0.0
    row["ms_per_crop"] = stats["median_ms"] / batch
    if device.type == "cuda":
        row["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    return row


def _configs(
    args: argparse.Namespace, device: torch.device, model_name: str
) -> Iterator[tuple[str, str, bool, int]]:
    batches = args.batch_sizes or (CUDA_BATCHES if device.type == "cuda" else CPU_BATCHES)
    if model_name == "distilpose_l" and args.max_batch_l:
        batches = [b for b in batches if b <= args.max_batch_l]
    flips = {"off": [False], "on": [True], "both": [False, True]}[args.flip]
    for precision in args.precisions:
        for mode in _modes(args, device):
            for flip in flips:
                for batch in batches:
                    if mode == "cuda_graph" and batch > args.cuda_graph_max_batch:
                        continue
                    only = args.compile_batch_sizes
                    if mode == "compile" and only and batch not in only:
                        continue
                    yield precision, mode, flip, batch


def run(args: argparse.Namespace) -> Path:
    """Run the sweep and write the JSON result file; returns its path."""
    from model import create_model

    apply_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    env = environment(args.device)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for precision in args.precisions:
        if precision != "fp32" and device.type != "cuda":
            skipped.append({"precision": precision, "reason": "CPU runs fp32 (service contract)"})
    args_cpu = argparse.Namespace(**vars(args))
    if device.type != "cuda":
        args_cpu.precisions = ["fp32"]
    for model_name in args.models:
        net = create_model(model_name, weights=None, device=str(device))
        net.eval()
        oom_at: dict[tuple[str, str, bool], int] = {}
        with torch.inference_mode():
            for precision, mode, flip, batch in _configs(args_cpu, device, model_name):
                key = (precision, mode, flip)
                if key in oom_at and batch > oom_at[key]:
                    skipped.append(
                        {
                            "model": model_name,
                            "batch": batch,
                            "precision": precision,
                            "mode": mode,
                            "flip": flip,
                            "reason": f"oom at batch {oom_at[key]}",
                        }
                    )
                    continue
                row = measure_one(
                    net,
                    model_name=model_name,
                    batch=batch,
                    precision=precision,
                    mode=mode,
                    flip=flip,
                    device=device,
                    args=args,
                )
                if row["status"] == "oom":
                    oom_at[key] = batch
                results.append(row)
                dump_json_line(row)
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return write_result(
        "model",
        args.device,
        args,
        results,
        out_dir=args.out_dir,
        env=env,
        extra={"skipped": skipped, "weights": "random (cost does not depend on values)"},
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m bench.model``."""
    path = run(parse_args(argv))
    dump_json_line({"written": str(path)})


if __name__ == "__main__":
    main()
