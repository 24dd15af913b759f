"""Model benchmark: crops/s and latency vs batch size for DistilPose-S and -L.

Sweeps batch size x precision (fp32; bf16 / fp16 autocast on CUDA only) x execution mode (eager,
``torch.compile``, CUDA graphs for small batches on CUDA) x flip test (off: one forward of B crops;
on: one forward of 2B crops, the crops and their mirror images, as the pipeline's flip test does).
Weights are random: the cost of a forward does not depend on the values.

``--backends torch openvino onnxruntime`` times the exported graph (``model.backends``: the pose
model's ``predict``, as the pipeline calls it) beside PyTorch eager, interleaved per batch size so
that load drifts hit every backend alike, and reports each backend's crops/s with its ratio to
PyTorch from the same run (``backend_comparison``). OpenVINO also runs bf16 where the CPU has it.

    python -m bench.model                          # CPU sweep (batch 1..64), eager
    python -m bench.model --models distilpose_s --flip off --batch-sizes 1 8 32 \
        --backends torch openvino onnxruntime --precisions fp32 bf16
    python -m bench.model --device cuda --compile both --cuda-graphs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    INTERRUPTED_EXIT,
    add_common_args,
    apply_threads,
    dump_json_line,
    environment,
    rows_so_far,
    summarize_ms,
    synchronize,
    time_repeats,
    write_result,
)

CPU_BATCHES = [1, 2, 4, 8, 16, 32, 64]
CUDA_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ONNX_BACKENDS = ("openvino", "onnxruntime")


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
    p.add_argument(
        "--backends",
        nargs="+",
        choices=["torch", *ONNX_BACKENDS],
        default=["torch"],
        help="CPU: also time the exported graph under these (see the module docstring)",
    )
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


def measure_interleaved(
    nets: dict[str, Any],
    *,
    model_name: str,
    batch: int,
    precision: str,
    flip: bool,
    device: torch.device,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Time several backends on the same input, round-robin (one call each per round), so that
    a change of machine load during the run hits them alike; eager mode. One row per backend."""
    first = next(iter(nets.values()))
    w, h = first.info.input_size
    x = torch.randn(batch, 3, h, w, device=device)  # (B, 3, H, W) normalised crops
    calls: dict[str, Callable[[], Any]] = {}
    for backend, net in nets.items():
        fwd = _forward_fn(net, flip)
        cast = precision if backend == "torch" else "fp32"  # a backend's variant is its precision

        def call(fwd: Callable[[torch.Tensor], Any] = fwd, cast: str = cast) -> Any:
            with _autocast(device, cast):
                return fwd(x)

        calls[backend] = call
    samples: dict[str, list[float]] = {backend: [] for backend in calls}
    errors: dict[str, str] = {}
    for _ in range(args.warmup):
        for call in calls.values():
            call()
    synchronize(device)
    spent = 0.0
    for i in range(args.repeats):
        for backend, call in calls.items():
            if backend in errors:
                continue
            try:
                t0 = time.perf_counter()
                call()
                synchronize(device)
                dt_s = time.perf_counter() - t0
            except Exception as exc:  # an OOM is a result, not a crash
                errors[backend] = f"{type(exc).__name__}: {exc}"[:500]
                continue
            samples[backend].append(dt_s)
            spent += dt_s
        if spent >= args.max_seconds * len(calls) and i + 1 >= args.min_repeats:
            break
    rows = []
    for backend in calls:
        row: dict[str, Any] = {
            "model": model_name,
            "batch": batch,
            "forward_batch": 2 * batch if flip else batch,
            "precision": precision,
            "mode": "eager",
            "flip": flip,
            "backend": backend,
            "interleaved": list(calls),
        }
        if backend in errors:
            row["status"] = "oom" if "out of memory" in errors[backend].lower() else "error"
            row["error"] = errors[backend]
        else:
            stats = summarize_ms(samples[backend])
            row.update(stats, status="ok", compile_s=None)
            row["crops_per_s"] = (
                batch / (stats["median_ms"] / 1000.0) if stats["median_ms"] else 0.0
            )
            row["ms_per_crop"] = stats["median_ms"] / batch
        rows.append(row)
    return rows


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


class _Exported:
    """A backend pose model as the timing loop calls it: ``net(x)`` is one ``predict``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.info = model.info

    def __call__(self, x: torch.Tensor) -> Any:
        return self.model.predict(x)


def _backend_nets(
    net: Any, model_name: str, backends: list[str], folder: Path
) -> dict[tuple[str, str], Any]:
    """(backend, precision) -> what to time: PyTorch's module, or the exported graph compiled
    (OpenVINO: f32, and bf16 where the CPU has it)."""
    from model.backends import wrap_pose_model
    from model.export import export_onnx

    nets: dict[tuple[str, str], Any] = {}
    path = folder / f"{model_name}.onnx"
    for backend in backends:
        if backend == "torch":
            nets[("torch", "fp32")] = net
            continue
        if not path.exists():
            export_onnx(net, model_name, path, check=False)  # random weights: see model.export
        wrapped = wrap_pose_model(net, backend, path)
        for precision, variant in wrapped.variants.items():
            nets[(backend, precision)] = _Exported(variant)
    return nets


def comparisons(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each backend's crops/s beside PyTorch eager fp32's at the same model, batch and flip:
    from the median call, and from the fastest call (``best_``: on a shared machine the call
    least disturbed by other load)."""
    torch_rows = {
        (r["model"], r["batch"], r["flip"]): r
        for r in results
        if r["status"] == "ok"
        and r["backend"] == "torch"
        and r["mode"] == "eager"
        and r["precision"] == "fp32"
    }
    out = []
    for r in results:
        base = torch_rows.get((r["model"], r["batch"], r["flip"]))
        if r["status"] != "ok" or r["backend"] == "torch" or not base or not base["crops_per_s"]:
            continue
        best, base_best = r["batch"] / r["min_ms"] * 1000.0, base["batch"] / base["min_ms"] * 1000.0
        out.append(
            {
                "model": r["model"],
                "batch": r["batch"],
                "flip": r["flip"],
                "backend": r["backend"],
                "precision": r["precision"],
                "crops_per_s": r["crops_per_s"],
                "torch_crops_per_s": base["crops_per_s"],
                "vs_torch": r["crops_per_s"] / base["crops_per_s"],
                "best_crops_per_s": best,
                "best_torch_crops_per_s": base_best,
                "best_vs_torch": best / base_best,
            }
        )
    return out


def run(args: argparse.Namespace) -> Path:
    """Run the sweep and write the JSON result file (the rows measured so far, marked
    ``interrupted``, when SIGINT stops it); returns its path."""
    apply_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    env = environment(args.device)
    backends = [b for b in args.backends if b == "torch" or device.type == "cpu"]
    for name in ONNX_BACKENDS:
        if name in backends:
            env[name] = _package_version(name)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for precision in args.precisions:
        if precision != "fp32" and device.type != "cuda":
            skipped.append(
                {"precision": precision, "reason": "torch on CPU runs fp32 (service contract)"}
            )
    stopped: dict[str, Any] = {}
    with rows_so_far(stopped):
        _sweep(args, device, backends, results, skipped)
    comparison = comparisons(results)
    for line in comparison:
        dump_json_line(line)
    return write_result(
        "model",
        args.device,
        args,
        results,
        out_dir=args.out_dir,
        env=env,
        extra={
            "skipped": skipped,
            "weights": "random (cost does not depend on values)",
            "backend_comparison": comparison,
            **stopped,
        },
    )


def _sweep(
    args: argparse.Namespace,
    device: torch.device,
    backends: list[str],
    results: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
) -> None:
    """Every configuration of ``run``, appending to ``results`` and ``skipped`` as it goes."""
    from model import create_model

    for model_name in args.models:
        net = create_model(model_name, weights=None, device=str(device))
        net.eval()
        oom_at: dict[tuple[str, str, bool], int] = {}
        with tempfile.TemporaryDirectory(prefix="bench-onnx-") as folder:
            nets = _backend_nets(net, model_name, backends, Path(folder))
            with torch.inference_mode():
                for precision, mode, flip, batch in _configs(args, device, model_name):
                    timed: dict[str, Any] = {}
                    for backend in backends:
                        if backend == "torch" and (device.type == "cuda" or precision == "fp32"):
                            timed[backend] = net
                        elif (
                            backend != "torch" and mode == "eager" and (backend, precision) in nets
                        ):
                            timed[backend] = nets[(backend, precision)]
                    key = (precision, mode, flip)
                    if "torch" in timed and key in oom_at and batch > oom_at[key]:
                        del timed["torch"]
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
                    config = {"model_name": model_name, "batch": batch, "flip": flip}
                    if len(timed) > 1:
                        rows = measure_interleaved(
                            timed, precision=precision, device=device, args=args, **config
                        )
                    else:
                        rows = [
                            measure_one(
                                timed[b],
                                precision=precision if b == "torch" else "fp32",
                                mode=mode,
                                device=device,
                                args=args,
                                **config,
                            )
                            | {"backend": b, "precision": precision}
                            for b in timed
                        ]
                    for row in rows:
                        if row["status"] == "oom" and row["backend"] == "torch":
                            oom_at[key] = batch
                        results.append(row)
                        dump_json_line(row)
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _package_version(name: str) -> str:
    import importlib

    return str(importlib.import_module(name).__version__)


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m bench.model``."""
    path = run(parse_args(argv))
    dump_json_line({"written": str(path)})
    if json.loads(path.read_text()).get("interrupted"):
        sys.exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
    main()
