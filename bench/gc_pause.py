"""How long a full garbage collection stops a serving process, before and after
``service.serving.freeze_startup_heap``.

The engine and the HTTP app are built as ``pose-service serve`` builds them (``--model``; random
weights where none are cached, which changes no object count), the engine started and warmed
up; then the full collection is timed three times, the start-up heap frozen, and timed again.
The event loop stands still for as long as a collection runs.

    python -m bench.gc_pause --models identity distilpose_s
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, environment, write_result
from service import serving
from service.metrics import Metrics
from service.model_choice import choose_model
from service.rest import create_app
from service.settings import Settings


def _collections_ms(repeats: int = 3) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


async def _measure(model: str) -> dict[str, Any]:
    settings = Settings(model=model, device="cpu", allow_random_weights=True)
    metrics = Metrics()
    engine = serving.build_engine(
        settings, serving.pipeline_factory(choose_model(settings), settings), metrics
    )
    await engine.start()
    try:
        create_app(engine, settings, metrics=metrics)
        gc.collect()
        tracked = len(gc.get_objects())
        before = _collections_ms()
        serving.freeze_startup_heap()
        frozen = gc.get_freeze_count()
        after = _collections_ms()
    finally:
        gc.unfreeze()
        await engine.stop()
    return {
        "model": model,
        "objects_tracked": tracked,
        "objects_frozen": frozen,
        "full_collection_ms": before,
        "full_collection_ms_frozen": after,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gc_pause", description=__doc__)
    parser.add_argument("--models", nargs="+", default=["identity", "distilpose_s"])
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    env = environment("cpu")
    rows = []
    for model in args.models:
        row = serving.run(_measure(model))
        rows.append(row)
        print(
            f"{model}: {row['objects_tracked']:,} objects; a full collection "
            f"{min(row['full_collection_ms']):.1f}-{max(row['full_collection_ms']):.1f} ms, "
            f"after freezing {min(row['full_collection_ms_frozen']):.2f}-"
            f"{max(row['full_collection_ms_frozen']):.2f} ms",
            flush=True,
        )
    path = write_result("gc_pause", "cpu", args, rows, out_dir=args.out_dir, env=env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
