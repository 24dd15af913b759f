"""What every benchmark script shares: environment capture, timing, statistics, result files,
resource sampling during serving runs, and the images the benchmarks feed.

Timing follows the usual rules: warm-up iterations first, ``torch.cuda.synchronize`` around every
timed call on CUDA, and medians / p95 over repeats rather than means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
ASSETS_DIR = BENCH_DIR / "assets"
SCHEMA_VERSION = 1
SPEED_ENV_PREFIXES = ("MALLOC_", "OMP_", "MKL_", "KMP_", "POSE_", "TORCH", "CUDA_", "NVIDIA_")
SPEED_ENV_NAMES = ("LD_PRELOAD",)
# glibc malloc settings that keep freed activation memory in the heap instead of returning it to
# the OS after every forward (which costs page faults on the next one); see BENCHMARKS.md.
MALLOC_TUNING = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "1073741824",
}

# A real person box (x, y, w, h) per committed asset: COCO's annotation for image 785, and boxes
# drawn by eye for the two portraits. They make "real-like" crops for caller-box runs.
ASSET_PERSON_BOXES: dict[str, tuple[float, float, float, float]] = {
    "coco_000000000785.jpg": (280.79, 44.73, 218.7, 346.68),
    "grace_hopper.jpg": (40.0, 20.0, 440.0, 580.0),
    "astronaut.jpg": (90.0, 10.0, 380.0, 500.0),
}


# ---------------------------------------------------------------------------------------------
# Environment and result files


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _nvidia_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip() or None


def command_line() -> str:
    """The exact command line of this process, as it was typed (interpreter included)."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return " ".join(argv)


def environment(device: str) -> dict[str, Any]:
    """Everything needed to reproduce or judge a number: device, driver, versions, CPU, load."""
    dev = torch.device(device)
    env: dict[str, Any] = {
        "device": str(dev),
        "device_name": _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": _nvidia_driver(),
        "git_commit": _git_commit(),
        "loadavg_start": list(os.getloadavg()),
        "command": command_line(),
        # Environment variables that change speed (allocator, thread pools, device selection).
        "env_vars": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith(SPEED_ENV_PREFIXES) or k in SPEED_ENV_NAMES
        },
        "cwd": os.getcwd(),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env["device_name"] = props.name
        env["gpu_memory_bytes"] = props.total_memory
        env["gpu_count"] = torch.cuda.device_count()
    return env


def device_tag(device: str) -> str:
    """A short file-name tag for a device: ``cpu`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return dev.type
    name = torch.cuda.get_device_name(dev.index or 0).lower()
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def write_result(
    part: str,
    device: str,
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    *,
    out_dir: Path,
    env: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write one JSON result file and return its path.

    Args:
        part: "model", "pipeline", "decode" or "serve".
        device: the torch device string the numbers were measured on.
        args: the parsed command-line arguments (stored verbatim).
        results: one dict per measured configuration.
        out_dir: where to write (created if missing).
        env: ``environment(device)`` captured at the start of the run.
        extra: anything else worth keeping (skipped configurations, summaries).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{part}-{device_tag(device)}-{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = out_dir / f"{part}-{device_tag(device)}-{stamp}-{n}.json"
    env = {**env, "loadavg_end": list(os.getloadavg())}
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "part": part,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "env": env,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "results": results,
    }
    if extra:
        doc.update(extra)
    path.write_text(json.dumps(doc, indent=1, default=str, allow_nan=False) + "\n")
    return path


def add_common_args(parser: argparse.ArgumentParser, *, default_device: str = "cpu") -> None:
    """The flags every script takes: --device, --out-dir, --threads."""
    parser.add_argument("--device", default=default_device, help="cpu or cuda[:N]")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where JSON goes")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)"
    )


def apply_threads(threads: int) -> None:
    """Set torch's intra-op thread count when asked (0 keeps the default)."""
    if threads > 0:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Timing and statistics


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work on CUDA; a no-op on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_repeats(
    fn: Callable[[], object],
    *,
    device: torch.device | str,
    warmup: int,
    repeats: int,
    max_seconds: float = float("inf"),
    min_repeats: int = 1,
) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then time up to ``repeats`` calls.

    Stops early once ``max_seconds`` of timed calls have passed and ``min_repeats`` calls are done.

    Returns:
        Seconds per call, in call order.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    spent = 0.0
    for i in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        dt_s = time.perf_counter() - t0
        samples.append(dt_s)
        spent += dt_s
        if spent >= max_seconds and i + 1 >= min_repeats:
            break
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN-free (0.0 when empty)."""
    if not values:
        return 0.0
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize_ms(samples_s: Sequence[float]) -> dict[str, float | int]:
    """Median, p95, mean, min and max of samples given in seconds, reported in milliseconds."""
    ms = [s * 1000.0 for s in samples_s]
    return {
        "n": len(ms),
        "median_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "mean_ms": float(np.mean(ms)) if ms else 0.0,
        "min_ms": min(ms) if ms else 0.0,
        "max_ms": max(ms) if ms else 0.0,
    }


def alternating_medians(
    cases: Sequence[tuple[str, str]],
    measure: Callable[[str, str], dict[str, Any]],
    rounds: int,
) -> list[dict[str, Any]]:
    """``measure(target, mode)`` for every case in turn, ``rounds`` times over (so that a drift
    of the machine's speed falls on every case alike), and one row per case: its CPU ms per
    request, each round's and the median, and the median requests/s (``bench.http_app``,
    ``bench.grpc_app``). ``measure`` returns ``cpu_ms_per_request``, ``requests_per_s`` and
    ``concurrency``."""
    measured: dict[tuple[str, str], list[dict[str, Any]]] = {case: [] for case in cases}
    for round_ in range(rounds):
        for target, mode in cases:
            row = measure(target, mode)
            measured[target, mode].append(row)
            print(
                f"round {round_ + 1} {target:14s} {mode:6s} "
                f"{row['cpu_ms_per_request']:.4f} ms CPU per request, "
                f"{row['requests_per_s']:,.0f} requests/s",
                flush=True,
            )
    rows = []
    for (target, mode), runs in measured.items():
        cpu = [r["cpu_ms_per_request"] for r in runs]
        rows.append(
            {
                "target": target,
                "mode": mode,
                "concurrency": runs[0]["concurrency"],
                "rounds": len(runs),
                "cpu_ms_per_request_median": statistics.median(cpu),
                "cpu_ms_per_request": cpu,
                "requests_per_s_median": statistics.median(r["requests_per_s"] for r in runs),
            }
        )
        print(f"{target:14s} {mode:6s} median {statistics.median(cpu):.4f} ms CPU per request")
    return rows


# ---------------------------------------------------------------------------------------------
# Resource sampling (serving runs)


def _proc_cpu_seconds(pid: int, *, system_only: bool = False) -> float | None:
    """User + system CPU seconds of ``pid`` so far (system only: time in the kernel); None once
    it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3, utime 14, stime 15 (1-based over the whole line).
    ticks = int(fields[12]) + (0 if system_only else int(fields[11]))
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int], *, system_only: bool = False) -> float:
    """User + system CPU seconds of ``pids`` so far, summed over those still running (system
    only: time in the kernel)."""
    seconds = (_proc_cpu_seconds(pid, system_only=system_only) for pid in pids)
    return sum(s for s in seconds if s is not None)


def _proc_rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, now (a service with front-end processes is a tree)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    return tree


class ResourceSampler:
    """Polls process RSS and CPU% (via /proc) and, on CUDA, GPU utilisation and memory.

    A name may stand for several processes (``process_tree``: a service's supervisor, engine and
    front ends): its CPU% and RSS are their sums (shared pages such as torch's libraries counted
    once per process). GPU figures come from ``nvidia-smi`` when it is installed, else from
    ``torch.cuda.mem_get_info`` (memory only). Use as a context manager around a load run.
    """

    def __init__(
        self, pids: dict[str, int | list[int]], *, gpu: bool, interval_s: float = 0.25
    ) -> None:
        self.pids = {name: [p] if isinstance(p, int) else list(p) for name, p in pids.items()}
        self.gpu = gpu
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples: list[dict[str, Any]] = []

    def __enter__(self) -> ResourceSampler:
        self._stop.clear()
        self.samples = []
        self._thread = threading.Thread(target=self._loop, name="resource-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _gpu_sample(self) -> dict[str, Any]:
        exe = shutil.which("nvidia-smi")
        if exe is not None:
            try:
                out = subprocess.run(
                    [
                        exe,
                        "--query-gpu=index,utilization.gpu,memory.used,memory.total",
                        "--format=csv,noheader,nounits",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=True,
                ).stdout
                gpus = []
                for line in out.strip().splitlines():
                    idx, util, used, total = (x.strip() for x in line.split(","))
                    gpus.append(
                        {
                            "index": int(idx),
                            "util_pct": float(util),
                            "mem_used_mib": float(used),
                            "mem_total_mib": float(total),
                        }
                    )
                return {"gpus": gpus}
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
        if torch.cuda.is_available():
            mem_rows: list[dict[str, Any]] = []
            for i in range(torch.cuda.device_count()):
                free_b, total_b = torch.cuda.mem_get_info(i)
                mem_rows.append({"index": i, "mem_used_mib": (total_b - free_b) / 2**20})
            return {"gpus": mem_rows}
        return {}

    @staticmethod
    def _cpu_seconds(pids: list[int]) -> float | None:
        """Summed over ``pids``; None once any of them is gone (the sum would jump)."""
        seconds = [_proc_cpu_seconds(pid) for pid in pids]
        return None if None in seconds else sum(s for s in seconds if s is not None)

    def _loop(self) -> None:
        last_cpu = {name: self._cpu_seconds(pids) for name, pids in self.pids.items()}
        last_t = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            sample: dict[str, Any] = {"t": now}
            for name, pids in self.pids.items():
                cpu = self._cpu_seconds(pids)
                prev = last_cpu.get(name)
                pct = None
                if cpu is not None and prev is not None and now > last_t:
                    pct = 100.0 * (cpu - prev) / (now - last_t)
                last_cpu[name] = cpu
                rss = sum(_proc_rss_bytes(pid) or 0 for pid in pids)
                sample[name] = {"rss_mib": rss / 2**20, "cpu_pct": pct}
            if self.gpu:
                sample.update(self._gpu_sample())
            last_t = now
            self.samples.append(sample)

    def summary(self) -> dict[str, Any]:
        """Per process: max RSS and mean/max CPU%; per GPU: mean/max utilisation, max memory."""
        out: dict[str, Any] = {"n_samples": len(self.samples), "interval_s": self.interval_s}
        for name in self.pids:
            rss = [s[name]["rss_mib"] for s in self.samples if name in s]
            cpu = [
                s[name]["cpu_pct"]
                for s in self.samples
                if name in s and s[name]["cpu_pct"] is not None
            ]
            out[name] = {
                "rss_mib_max": max(rss) if rss else 0.0,
                "cpu_pct_mean": float(np.mean(cpu)) if cpu else 0.0,
                "cpu_pct_max": max(cpu) if cpu else 0.0,
            }
        gpu_rows: dict[int, list[dict[str, Any]]] = {}
        for s in self.samples:
            for g in s.get("gpus", []):
                gpu_rows.setdefault(g["index"], []).append(g)
        if gpu_rows:
            out["gpus"] = {}
            for idx, rows in gpu_rows.items():
                util = [r["util_pct"] for r in rows if "util_pct" in r]
                mem = [r["mem_used_mib"] for r in rows]
                out["gpus"][str(idx)] = {
                    "util_pct_mean": float(np.mean(util)) if util else None,
                    "util_pct_max": max(util) if util else None,
                    "mem_used_mib_max": max(mem) if mem else None,
                }
        return out


# ---------------------------------------------------------------------------------------------
# Images


@dataclass
class BenchImage:
    """An encoded test image and one real-like person box in its pixels."""

    name: str
    data: bytes  # JPEG bytes
    width: int
    height: int
    person_box: tuple[float, float, float, float]  # x, y, w, h


def synthetic_jpeg(width: int, height: int, *, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth gradients, soft shapes and sensor noise (so it does not compress
    to nothing, which would make decoding unrealistically cheap)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(xx / (width / rng.uniform(1, 4)) + rng.uniform(0, 6)),
            128 + 100 * np.cos(yy / (height / rng.uniform(1, 4)) + rng.uniform(0, 6)),
            128 + 60 * np.sin((xx + yy) / (width / rng.uniform(2, 6))),
        ],
        axis=-1,
    )
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.05, 0.5) * width, rng.uniform(0.05, 0.5) * height
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x0, y0, x0 + w, y0 + h), fill=color)
    img = img.filter(ImageFilter.GaussianBlur(2))
    noisy = np.asarray(img).astype(np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def load_images(synthetic: int = 0, size: tuple[int, int] = (640, 480)) -> list[BenchImage]:
    """The committed real photos in bench/assets, plus ``synthetic`` generated ones of ``size``."""
    images: list[BenchImage] = []
    for name, box in ASSET_PERSON_BOXES.items():
        path = ASSETS_DIR / name
        if not path.exists():
            continue
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        images.append(BenchImage(name, data, w, h, box))
    for i in range(synthetic):
        w, h = size
        box = (0.3 * w, 0.1 * h, 0.35 * w, 0.8 * h)
        images.append(BenchImage(f"synthetic_{i}.jpg", synthetic_jpeg(w, h, seed=i), w, h, box))
    return images


def person_boxes(
    width: int,
    height: int,
    n: int,
    *,
    seed: int,
    anchor: tuple[float, float, float, float] | None = None,
) -> torch.Tensor:
    """``n`` real-like person boxes inside a ``width`` x ``height`` image.

    The first box is ``anchor`` when given (a real annotation); the others have human proportions
    (w/h 0.35..0.8, height 25..90 % of the image) at seeded random places.

    Returns:
        (n, 5) float32 [x, y, w, h, score] in pixels.
    """
    rng = np.random.default_rng(seed)
    rows: list[list[float]] = []
    if anchor is not None and n > 0:
        rows.append([*anchor, 1.0])
    while len(rows) < n:
        h = rng.uniform(0.25, 0.9) * height
        w = min(rng.uniform(0.35, 0.8) * h, 0.95 * width)
        x = rng.uniform(0, width - w)
        y = rng.uniform(0, height - h)
        rows.append([x, y, w, h, float(rng.uniform(0.5, 1.0))])
    return torch.tensor(rows, dtype=torch.float32).reshape(n, 5)


@contextlib.contextmanager
def rows_so_far(extra: dict[str, Any]) -> Iterator[None]:
    """Run a measuring loop until SIGINT (``gpu_check.sh``'s time box, or Ctrl-C), then carry on,
    so that the caller writes the rows measured so far, with ``extra["interrupted"] = True``
    (exit with ``INTERRUPTED_EXIT`` afterwards). In a coroutine under ``asyncio.run`` SIGINT
    arrives as the main task's cancellation, which is caught too: use it only around a bench's
    own top-level loop."""
    try:
        yield
    except (KeyboardInterrupt, asyncio.CancelledError):
        extra["interrupted"] = True
        print("interrupted: writing the rows measured so far", file=sys.stderr, flush=True)


INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def dump_json_line(obj: dict[str, Any]) -> None:
    """One progress line on stdout for a human watching the run (scripts only)."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()
