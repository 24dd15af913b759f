"""``bench.serve --backends``: parsing, the interleaved schedule, one service per backend and the
ratio to torch. No server starts here (``test_bench_smoke.py`` runs the harness end to end)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import serve
from bench.servers import engine_server


def test_without_backends_the_schedule_is_unchanged() -> None:
    args = serve.parse_args(["--concurrency", "4", "16", "--rounds", "2"])
    assert args.backends is None
    assert serve.schedule(args) == [
        (rnd, c, None, t) for rnd in (0, 1) for c in (4, 16) for t in serve.ALL_TARGETS
    ]


def test_backends_interleave_level_by_level_and_alternate_by_round() -> None:
    flags = (
        "--concurrency 4 16 --rounds 2 --targets engine-http naive-http --backends torch openvino"
    )
    args = serve.parse_args(flags.split())
    assert args.backends == ["torch", "openvino"]
    assert serve.schedule(args) == [
        (0, 4, "torch", "engine-http"),
        (0, 4, "openvino", "engine-http"),
        (0, 4, None, "naive-http"),
        (0, 16, "torch", "engine-http"),
        (0, 16, "openvino", "engine-http"),
        (0, 16, None, "naive-http"),
        (1, 4, "openvino", "engine-http"),
        (1, 4, "torch", "engine-http"),
        (1, 4, None, "naive-http"),
        (1, 16, "openvino", "engine-http"),
        (1, 16, "torch", "engine-http"),
        (1, 16, None, "naive-http"),
    ]


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(SystemExit):
        serve.parse_args(["--backends", "tensorrt"])


def test_one_service_per_backend(tmp_path: Path) -> None:
    args = serve.parse_args(
        ["--backends", "torch", "openvino", "--engine-env", "POSE_BACKEND=onnxruntime"]
    )
    plain = engine_server(args, tmp_path)
    assert plain.name == "engine" and plain.env_overrides["POSE_BACKEND"] == "onnxruntime"
    servers = [engine_server(args, tmp_path, b) for b in args.backends]
    assert [s.name for s in servers] == ["engine-torch", "engine-openvino"]
    # --backends wins over --engine-env; each service has its own ports and log.
    assert [s.env_overrides["POSE_BACKEND"] for s in servers] == ["torch", "openvino"]
    assert servers[0].http_port != servers[1].http_port
    assert servers[0].log_path != servers[1].log_path


def test_backend_comparisons_pair_rows_measured_beside_each_other() -> None:
    def row(rnd: int, backend: str | None, rps: float) -> dict[str, object]:
        r: dict[str, object] = {
            "round": rnd,
            "concurrency": 4,
            "target": "engine-http",
            "server": "engine",
            "throughput_rps": rps,
            "p50_ms": 1000.0 / rps,
            "p99_ms": 2000.0 / rps,
        }
        if backend is not None:
            r["backend"] = backend
        return r

    rows = [row(0, "torch", 4.0), row(0, "openvino", 10.0), row(1, "openvino", 6.0)]
    rows.append(row(1, "torch", 3.0))
    comps = serve.backend_comparisons(rows)
    assert [(c["round"], c["backend"]) for c in comps] == [(0, "openvino"), (1, "openvino")]
    assert [c["throughput_ratio"] for c in comps] == pytest.approx([2.5, 2.0])
    assert comps[0]["torch_p99_ms"] == pytest.approx(500.0)
    assert comps[0]["p50_ms"] == pytest.approx(100.0)
    # Without --backends there is nothing to compare.
    assert serve.backend_comparisons([row(0, None, 4.0)]) == []


def test_report_shows_each_rows_backend_and_the_ratio_to_torch() -> None:
    from bench import report

    def row(backend: str, rps: float) -> dict[str, object]:
        return {
            "round": 0,
            "concurrency": 4,
            "target": "engine-http",
            "backend": backend,
            "server": f"engine-{backend}",
            "throughput_rps": rps,
            "p50_ms": 500.0,
            "p95_ms": 700.0,
            "p99_ms": 800.0,
            "ok": 10,
            "refused": 0,
            "errors": 0,
            "loadavg": [2.0, 2.0, 2.0],
        }

    comparison = {
        "round": 0,
        "concurrency": 4,
        "target": "engine-http",
        "backend": "openvino",
        "rps": 7.2,
        "torch_rps": 3.6,
        "throughput_ratio": 2.0,
        "p50_ms": 570.0,
        "p99_ms": 790.0,
        "torch_p50_ms": 1165.0,
        "torch_p99_ms": 1430.0,
    }
    doc = {
        "results": [row("torch", 3.6), row("openvino", 7.2)],
        "backend_comparisons": [comparison],
    }
    text = report.serve_tables(doc)
    assert "| engine-http (torch) | 3.60 |" in text and "| engine-http (openvino) | 7.20 |" in text
    assert (
        "| 0 | 4 | engine-http | openvino | 7.20 | 3.60 | 2.00x | 570 / 790 | 1,165 / 1,430 |"
        in text
    )
