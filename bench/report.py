"""Markdown tables from result files, for BENCHMARKS.md.

python -m bench.report bench/results/serve-cpu-*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def env_line(doc: dict[str, Any]) -> str:
    """One line: device, versions, CPU, load, command."""
    env = doc["env"]
    return (
        f"Device `{env['device']}` ({env['device_name']}), {env['cpu_count']} cores "
        f"({env['cpu_model']}), torch {env['torch']}, torchvision {env['torchvision']}, "
        f"driver {env.get('driver') or 'n/a'}, torch threads {env['torch_threads']}; load average "
        f"{_f(env['loadavg_start'][0], 2)} at start, {_f(env['loadavg_end'][0], 2)} at end; "
        f"{doc['created']}.\n\nCommand: `{env['command']}`"
    )


def model_tables(doc: dict[str, Any]) -> str:
    """Crops/s (median ms) per batch size, one row per model x backend x mode x precision x
    flip (rows of ``--backends`` runs carry their backend; older rows are PyTorch's)."""
    rows = [r for r in doc["results"] if r.get("status") == "ok"]
    batches = sorted({r["batch"] for r in rows})
    groups: dict[tuple[str, str, str, str, bool], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        key = (r["model"], r.get("backend", "torch"), r["mode"], r["precision"], r["flip"])
        groups[key][r["batch"]] = r
    out = []
    for key, by_batch in groups.items():
        cells = []
        for b in batches:
            r = by_batch.get(b)
            cells.append(f"{_f(r['crops_per_s'])} ({_f(r['median_ms'])})" if r else "-")
        out.append([key[0], key[1], key[2], key[3], "on" if key[4] else "off", *cells])
    header = ["model", "backend", "mode", "precision", "flip", *[f"B={b}" for b in batches]]
    failed = [r for r in doc["results"] if r.get("status") != "ok"]
    text = "crops/s (median ms per call):\n\n" + _table(header, out)
    if failed:
        text += "\n\nNot measured: " + "; ".join(
            f"{r['model']} {r['mode']} {r['precision']} B={r['batch']}: {r['status']}"
            for r in failed
        )
    return text


def decode_tables(doc: dict[str, Any]) -> str:
    """Images/s per decoder, device, workers and batch."""
    rows = [
        [
            r["decoder"],
            r["device"],
            str(r["workers"]),
            str(r["batch"]),
            _f(r["images_per_s"]),
            _f(r["ms_per_image"], 2),
        ]
        for r in doc["results"]
        if "images_per_s" in r
    ]
    img = doc.get("image", {})
    head = f"{img.get('width')}x{img.get('height')} JPEG, quality {img.get('quality')}:\n\n"
    return head + _table(
        ["decoder", "device", "threads", "images per round", "images/s", "ms/image"], rows
    )


def pipeline_tables(doc: dict[str, Any]) -> str:
    """Caller-box table and detector table."""
    cb = [r for r in doc["results"] if r["section"] == "caller_boxes"]
    t1 = _table(
        ["persons/image", "images/call", "flip", "median ms", "p95 ms", "images/s", "crops/s"],
        [
            [
                str(r["persons_per_image"]),
                str(r["images_per_call"]),
                "on" if r["flip"] else "off",
                _f(r["median_ms"]),
                _f(r["p95_ms"]),
                _f(r["images_per_s"], 2),
                _f(r["crops_per_s"], 1),
            ]
            for r in cb
        ],
    )
    det = [r for r in doc["results"] if r["section"] != "caller_boxes"]
    rows = []
    for r in det:
        if r.get("status") != "ok":
            rows.append([r["detector"], r["section"], str(r["images_per_call"]), "error", "-", "-"])
            continue
        counts = r.get("boxes_per_image") or r.get("persons_per_image") or []
        mean = sum(counts) / len(counts) if counts else 0.0
        rows.append(
            [
                r["detector"],
                r["section"],
                str(r["images_per_call"]),
                _f(r["median_ms"]),
                _f(r["images_per_s"], 2),
                _f(mean),
            ]
        )
    t2 = _table(
        ["detector", "section", "images/call", "median ms", "images/s", "boxes or persons/image"],
        rows,
    )
    skipped = doc.get("skipped") or []
    text = "Caller boxes:\n\n" + t1 + "\n\nDetectors (random weights):\n\n" + t2
    if skipped:
        text += "\n\nSkipped: " + "; ".join(
            f"{s.get('detector') or _caller_key(s)}: {s['reason']}" for s in skipped
        )
    return text


def _caller_key(s: dict[str, Any]) -> str:
    return f"{s.get('persons_per_image')} persons x {s.get('images_per_call')} images"


def serve_tables(doc: dict[str, Any]) -> str:
    """Per level table, then the engine-vs-naive comparison."""
    rows = []
    for r in doc["results"]:
        res = r.get("resources", {})
        server = res.get(r["server"], {})
        rows.append(
            [
                str(r.get("round", 0)),
                str(r["concurrency"]),
                r["target"] + (f" ({r['backend']})" if r.get("backend") else ""),
                _f(r["throughput_rps"], 2),
                _f(r["p50_ms"], 0),
                _f(r["p95_ms"], 0),
                _f(r["p99_ms"], 0),
                str(r["ok"]),
                str(r["refused"]),
                str(r["errors"]),
                _f(server.get("cpu_pct_mean"), 0),
                _f(server.get("rss_mib_max"), 0),
                _f(r["loadavg"][0], 2),
            ]
        )
    t1 = _table(
        [
            "round",
            "conc.",
            "target",
            "req/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "ok",
            "refused",
            "errors",
            "server CPU %",
            "server RSS MiB",
            "load",
        ],
        rows,
    )
    comp = [
        [
            str(c["round"]),
            str(c["concurrency"]),
            c["target"],
            _f(c["engine_rps"], 2),
            _f(c["naive_rps"], 2),
            _f(c["throughput_ratio"], 2) + "x",
            _f(c["engine_p99_ms"], 0),
            _f(c["naive_p50_ms"], 0),
            _f(c["p99_over_naive_p50"], 2) + "x",
        ]
        for c in doc.get("comparisons", [])
    ]
    t2 = _table(
        [
            "round",
            "conc.",
            "engine target",
            "engine req/s",
            "naive req/s",
            "ratio",
            "engine p99 ms",
            "naive p50 ms",
            "p99 / naive p50",
        ],
        comp,
    )
    text = "Per level:\n\n" + t1 + "\n\nEngine vs naive, side by side:\n\n" + t2
    backends = [
        [
            str(c["round"]),
            str(c["concurrency"]),
            c["target"],
            c["backend"],
            _f(c["rps"], 2),
            _f(c["torch_rps"], 2),
            _f(c["throughput_ratio"], 2) + "x",
            _f(c["p50_ms"], 0) + " / " + _f(c["p99_ms"], 0),
            _f(c["torch_p50_ms"], 0) + " / " + _f(c["torch_p99_ms"], 0),
        ]
        for c in doc.get("backend_comparisons", [])
    ]
    if backends:
        header = ["round", "conc.", "target", "backend", "req/s", "torch req/s", "ratio"]
        header += ["p50 / p99 ms", "torch p50 / p99 ms"]
        text += "\n\nBackends against torch, same levels:\n\n" + _table(header, backends)
    return text


def frontend_tables(doc: dict[str, Any]) -> str:
    """``bench.frontend``: server CPU per request (process tree), the engine's share, req/s."""
    rows = [
        [
            r["target"],
            _model_of(r),
            r["mode"],
            str(r["concurrency"]),
            _f(r["server_cpu_ms_per_request"], 3) if r["server_cpu_ms_per_request"] else "-",
            _f(r["engine_cpu_ms_per_request"], 3) if r["engine_cpu_ms_per_request"] else "-",
            f"{100 * r['kernel_share']:.0f} %" if r.get("kernel_share") is not None else "-",
            _f(r["requests_per_s"], 0),
            str(sum(r["not_ok"].values())),
        ]
        for r in doc["results"]
    ]
    header = ["target", "model", "mode", "C", "server CPU ms/req", "engine ms/req", "in kernel"]
    header += ["req/s", "not ok"]
    text = _table(header, rows)
    start_up = doc.get("start_up")
    if start_up:
        rows = [
            [
                s["target"],
                _model_of(s),
                _f(s["ready_s"], 1),
                str(len(s["processes"])),
                _f(s["pss_mb"], 0),
                " / ".join(_f(p["rss_mb"], 0) for p in s["processes"]),
            ]
            for s in start_up
        ]
        header = ["target", "model", "ready s", "processes", "PSS MB", "RSS MB per process"]
        text += "\n\nStart-up:\n\n" + _table(header, rows)
    return text


def _model_of(row: dict[str, Any]) -> str:
    """The model a ``bench.frontend`` row's service served (files before ``--models``: the
    identity model); "-" for a baseline."""
    if not row["target"].startswith("service-"):
        return "-"
    return str(row.get("model") or "identity")


def ipc_tables(doc: dict[str, Any]) -> str:
    """``bench.ipc``: CPU per round trip of each process, by transport and messages in flight."""
    rows = [
        [
            r["transport"],
            str(r["inflight"]),
            _f(r["client_us"], 1),
            _f(r["server_us"], 1),
            _f(r["client_us"] + r["server_us"], 1),
            _f(r["round_trips_per_s"], 0),
        ]
        for r in doc["results"]
    ]
    header = ["transport", "in flight", "client us", "server us", "both us", "round trips/s"]
    return _table(header, rows)


def engine_cycle_tables(doc: dict[str, Any]) -> str:
    """``bench.engine_cycle``: the engine process's CPU per job and per cycle by burst size, and
    the fitted line."""
    rows = [
        [
            str(r["burst"]),
            "eager" if r["eager"] else "unary",
            _f(r["engine_us_per_job"], 1),
            _f(r["engine_us_per_cycle"], 0),
            _f(r["jobs_per_s"], 0),
        ]
        for r in doc["results"]
    ]
    header = ["burst", "jobs", "engine us/job", "engine us/cycle", "jobs/s"]
    text = _table(header, rows)
    fits = [
        [
            "eager" if f["eager"] else "unary",
            _f(f["fixed_us_per_cycle"], 0),
            _f(f["us_per_job"], 1),
        ]
        for f in doc.get("fit", [])
    ]
    if fits:
        text += "\n\nFitted, CPU per cycle = fixed + burst x per job:\n\n"
        text += _table(["jobs", "fixed us per cycle", "us per job"], fits)
    return text


def batch_queue_tables(doc: dict[str, Any]) -> str:
    """``bench.batch_queue``: microseconds to form one batch, by queue, sources and batch size."""
    rows = [
        [
            str(r["queued"]),
            str(r["sources"]),
            str(r["batch"]),
            _f(r["us_per_batch_median"], 1),
            _f(r["us_per_batch_mean"], 1),
        ]
        for r in doc["results"]
    ]
    header = ["queued", "sources", "batch", "us per batch (median)", "us per batch (mean)"]
    return _table(header, rows)


def http_app_tables(doc: dict[str, Any]) -> str:
    """``bench.http_app`` and ``bench.grpc_app``: the app's (the servicer's) CPU per pose request,
    in process, by target and mode, and its ratio to the bare one of the same mode."""
    bare = {r.get("mode", "raw"): r for r in doc["results"] if r["target"] == "bare"}
    rows = []
    for r in doc["results"]:
        mode = r.get("mode", "raw")  # (files written before --modes: raw)
        base = bare.get(mode)
        ratio = r["cpu_ms_per_request_median"] / base["cpu_ms_per_request_median"] if base else None
        rows.append(
            [
                r["target"],
                mode,
                str(r["concurrency"]),
                str(r["rounds"]),
                _f(r["cpu_ms_per_request_median"], 4),
                " / ".join(_f(v, 4) for v in r["cpu_ms_per_request"]),
                "-" if ratio is None else _f(ratio, 2),
                _f(r["requests_per_s_median"], 0),
            ]
        )
    header = [
        "target", "mode", "C", "rounds", "CPU ms/req (median)", "each round", "ratio to bare",
        "req/s",
    ]  # fmt: skip
    return _table(header, rows)


def gc_pause_tables(doc: dict[str, Any]) -> str:
    """``bench.gc_pause``: a full collection's pause in a serving process, before and after the
    start-up heap is frozen."""
    rows = [
        [
            r["model"],
            f"{r['objects_tracked']:,}",
            " / ".join(_f(v, 1) for v in r["full_collection_ms"]),
            " / ".join(_f(v, 2) for v in r["full_collection_ms_frozen"]),
        ]
        for r in doc["results"]
    ]
    header = ["model", "objects tracked", "full collection ms", "after freezing, ms"]
    return _table(header, rows)


def cpu_quota_tables(doc: dict[str, Any]) -> str:
    """``bench.cpu_quota``: the CPU pipeline under a cgroup CPU limit, PyTorch's default threads
    against the service's (each round's figure, ``/``-separated)."""

    def each(values: list[float], digits: int = 1) -> str:
        return " / ".join(_f(float(v), digits) for v in values)

    rows = [
        [
            r["case"],
            _f(r["quota_cpus"]),
            str(r["threads"]),
            each(r["images_per_s"]),
            each(r["call_ms_p50"]),
            each(r["call_ms_p90"]),
            each(r["throttled_s"], 2),
        ]
        for r in doc["results"]
    ]
    header = [
        "threads from", "CPU limit", "threads", "images/s", "call p50 ms", "call p90 ms",
        "throttled s",
    ]  # fmt: skip
    return _table(header, rows)


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "batch_queue": batch_queue_tables,
    "cpu_quota": cpu_quota_tables,
    "engine_cycle": engine_cycle_tables,
    "frontend": frontend_tables,
    "gc_pause": gc_pause_tables,
    "http_app": http_app_tables,
    "grpc_app": http_app_tables,
    "ipc": ipc_tables,
    "model": model_tables,
    "decode": decode_tables,
    "pipeline": pipeline_tables,
    "serve": serve_tables,
}


def render(path: Path) -> str:
    """Markdown for one result file."""
    doc = json.loads(path.read_text())
    body = RENDERERS[doc["part"]](doc)
    return f"### {doc['part']}: `{path.name}`\n\n{env_line(doc)}\n\n{body}\n"


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m bench.report FILE...``."""
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    p.add_argument("files", type=Path, nargs="+")
    args = p.parse_args(argv)
    for path in args.files:
        sys.stdout.write(render(path) + "\n")


if __name__ == "__main__":
    main()
