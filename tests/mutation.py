"""A small mutation check: hand-picked breaks, each made alone in a temporary copy of the
repository, and the tests that must catch it.

    .venv/bin/python -m tests.mutation            # every mutation
    .venv/bin/python -m tests.mutation --list     # what would run
    .venv/bin/python -m tests.mutation stream_slot_released_before_write churn_queue_remove

The working tree is never touched (others edit it while this runs): the files git knows (tracked
and untracked-not-ignored, as they are on disk now) are copied to a temporary folder once; each
mutation replaces one exact snippet of one file there, runs its tests with this interpreter
(``python -m pytest -x``, so the copy is what gets imported), and puts the file back. A mutation is
*killed* when a test fails, *survived* when all pass. A mutation whose snippet is not in the file
(the code moved) is reported *not found* and skipped, so the list is data that outlives a refactor:
update the snippet when that happens. Before any mutation, the tests of every mutation must pass
on the unmutated copy, or the result would mean nothing.

Exit status: 1 when a mutation survived or its run failed to start, else 0 (a mutation not found,
or whose tests all skipped here, e.g. for want of CUDA, is reported, not counted).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60  # per test (pytest-timeout): a mutant that hangs a test fails it
RUN_LIMIT_S = 600  # per mutation, all its tests


@dataclass(frozen=True)
class Mutation:
    """One break: in ``file``, ``snippet`` (exact, found once) becomes ``replacement``."""

    name: str
    file: str
    snippet: str
    replacement: str
    tests: tuple[str, ...]
    what: str


MUTATIONS: tuple[Mutation, ...] = (
    # model/crops.py
    Mutation(
        "crops_padding_ignored",
        "model/crops.py",
        "    return centers, scales * padding\n",
        "    return centers, scales * 1.25\n",
        ("tests/model/test_crops.py::test_boxes_to_center_scale_fixes_the_aspect_and_pads",),
        "box padding fixed at 1.25 whatever the caller asks (padding=1.0 unchecked before)",
    ),
    Mutation(
        "crops_flip_back_no_swap",
        "model/crops.py",
        "    swapped = coords.index_select(1, flip_index.to(coords.device))\n",
        "    swapped = coords\n",
        ("tests/model/test_crops.py::test_merge_flip_score_quirk_and_per_crop_correction",),
        "flip test merges a mirrored pass without the left/right swap (the merge test compared "
        "flip_back with itself)",
    ),
    Mutation(
        "crops_decode_half_pixel",
        "model/crops.py",
        "        return (px * (size / wh) + c - size * 0.5).to(torch.float32)\n",
        "        return (px * (size / wh) + c - size * 0.5 + 0.5).to(torch.float32)\n",
        ("tests/model/test_crops.py",),
        "keypoints decoded half a pixel off",
    ),
    # the flip-score option through the pipeline (model/pipeline.py)
    Mutation(
        "pipeline_swap_scores_ignored",
        "model/pipeline.py",
        "swap = [plans[i].options.swap_flip_scores for i in members]",
        "swap = [False for i in members]",
        ("tests/model/test_pipeline.py::test_chunking_and_option_groups_do_not_change_answers",),
        "per-request swap_flip_scores ignored in a mixed batch (the test's `a != b or c != d` "
        "held anyway)",
    ),
    Mutation(
        "pipeline_empty_call_counts_work",
        "model/pipeline.py",
        "        if not plans:\n            return [], stats\n",
        "        if not plans:\n            stats.pose_crops = 1\n            return [], stats\n",
        ("tests/model/test_pipeline.py::test_describe_is_json_and_warmup_runs_every_stage",),
        "an empty call reports a pose crop (the test compared the stats with themselves)",
    ),
    # box validation (service/validation.py)
    Mutation(
        "boxes_below_image_accepted",
        "service/validation.py",
        "x >= width or y >= height or ",
        "x >= width or ",
        ("tests/service/test_engine.py::test_boxes_outside_the_image_are_refused_on_every_side",),
        "a box below the image (y >= height) is accepted",
    ),
    Mutation(
        "boxes_above_image_accepted",
        "service/validation.py",
        " or y + h <= 0:",
        ":",
        ("tests/service/test_engine.py::test_boxes_outside_the_image_are_refused_on_every_side",),
        "a box above the image (y + h <= 0) is accepted",
    ),
    Mutation(
        "boxes_right_edge_off_by_one",
        "service/validation.py",
        "x >= width or",
        "x > width or",
        ("tests/service/test_engine.py::test_boxes_outside_the_image_are_refused_on_every_side",),
        "a box starting exactly at the right edge is accepted",
    ),
    # service/batching.py
    Mutation(
        "queue_one_slot_more",
        "service/batching.py",
        "            if self._reserved >= self.max_queue_size:\n",
        "            if self._reserved > self.max_queue_size:\n",
        (
            "tests/service/test_rest_errors.py::"
            "test_overload_gives_429_with_retry_after_and_nothing_is_lost",
        ),
        "the queue admits max_queue_size + 1 jobs (the REST overload test's >= 13 let it pass)",
    ),
    Mutation(
        "queue_one_slot_less",
        "service/batching.py",
        "            if self._reserved >= self.max_queue_size:\n",
        "            if self._reserved >= self.max_queue_size - 1:\n",
        (
            "tests/service/test_rest_errors.py::"
            "test_overload_gives_429_with_retry_after_and_nothing_is_lost",
        ),
        "the queue admits max_queue_size - 1 jobs",
    ),
    Mutation(
        "churn_queue_remove",
        "service/batching.py",
        "        jobs = [job for job in self.order if job.state is JobState.QUEUED]\n",
        "        jobs = list(self.order)\n",
        (
            "tests/service/test_engine_lifecycle.py::"
            "test_every_job_gets_exactly_one_outcome_under_churn",
        ),
        "a job cancelled while queued is still taken into a batch and runs (the churn test did "
        "not assert it)",
    ),
    Mutation(
        "queue_expired_jobs_run",
        "service/batching.py",
        "                if job.deadline is not None and job.deadline <= now:\n",
        "                if False:\n",
        (
            "tests/service/test_engine_lifecycle.py::"
            "test_worker_fails_a_job_found_past_its_deadline",
        ),
        "a worker runs a job already past its deadline",
    ),
    # the engine's deadlines (service/engine.py)
    Mutation(
        "deadline_timer_does_nothing",
        "service/engine.py",
        '        self._finish(job, exc=DeadlineExceededError("the deadline passed before the '
        'answer"))\n',
        "        return\n",
        (
            "tests/service/test_engine_lifecycle.py::"
            "test_every_job_gets_exactly_one_outcome_under_churn",
        ),
        "the deadline timer answers nothing (churn: no deadline ever fired before)",
    ),
    Mutation(
        "deadline_timer_never_armed",
        "service/engine.py",
        "            job.timer = loop.call_at(",
        "            job.timer = None and loop.call_at(",
        (
            "tests/service/test_engine_lifecycle.py::"
            "test_deadline_while_running_answers_an_error_not_late",
        ),
        "no deadline timer: a running job is answered late, not at its deadline",
    ),
    # the stream window (service/rpc.py)
    Mutation(
        "stream_slot_released_before_write",
        "service/rpc.py",
        "                yield response\n                slots.release()\n",
        "                slots.release()\n                yield response\n",
        (
            "tests/service/test_rpc_stream.py::"
            "test_a_slot_is_given_back_only_once_its_answer_is_written",
        ),
        "a stream slot is given back before its answer is written",
    ),
    Mutation(
        "stream_window_plus_one",
        "service/rpc.py",
        "        slots = asyncio.Semaphore(window)\n",
        "        slots = asyncio.Semaphore(window + 1)\n",
        ("tests/service/test_rpc_stream.py",),
        "one frame more than the window in flight",
    ),
    Mutation(
        "stream_cancel_keeps_jobs",
        "service/rpc.py",
        "            for task in tasks:\n                task.cancel()\n",
        "            for task in tasks:\n                pass\n",
        ("tests/service/test_rpc_stream.py::test_cancelled_stream_drops_its_queued_jobs",),
        "a cancelled stream leaves its queued frames to run",
    ),
    Mutation(
        "pipeline_autocast_ignored",
        "model/pipeline.py",
        '        if self.device.type == "cuda" and precision in _AUTOCAST:\n',
        "        if False:\n",
        (
            "tests/model/test_pipeline_golden.py::"
            "test_cuda_fp32_matches_cpu_and_bf16_fp16_stay_close",
        ),
        "bf16/fp16 silently run as fp32 (the test printed them and asserted fp32 only); needs CUDA",
    ),
    # what the other audit items check
    Mutation(
        "render_draws_no_limbs",
        "service/client/draw.py",
        "            draw.line([start, end], fill=_side_colour(name), width=line * 2)\n",
        "            pass\n",
        ("tests/service/test_reference_http.py::test_render_draws_the_skeleton",),
        "the rendered image has no skeleton (the test checked the PNG magic only)",
    ),
    Mutation(
        "openapi_undocumented_status",
        "service/rest.py",
        '    400: "undecodable image, bad base64 or JSON, invalid boxes",\n',
        "",
        ("tests/service/test_rest_fuzz.py::test_every_answer_conforms_to_the_openapi_document",),
        "a status the API answers is missing from its OpenAPI document",
    ),
    Mutation(
        "bench_counts_no_answers",
        "bench/loadgen.py",
        "            self.latencies_s.append(latency_s)\n",
        "            pass\n",
        ("tests/bench/test_bench_smoke.py::test_serve_bench_smoke",),
        "the load generator counts no successful answer (the test asserted ok + refused >= 0)",
    ),
    Mutation(
        "ci_guard_off",
        "tests/conftest.py",
        '    if ON_CI and report.skipped and not hasattr(report, "wasxfail"):\n',
        "    if False:\n",
        ("tests/deploy/test_ci_guard.py",),
        "CI lets a missing tool or package skip its tests",
    ),
    # GPU-session insurance (stop 29)
    Mutation(
        "distilpose_head_in_autocast",
        "model/distilpose.py",
        "        with torch.autocast(kpt.device.type, enabled=False):\n",
        "        with torch.autocast(\n"
        "            kpt.device.type, enabled=torch.is_autocast_enabled(kpt.device.type)\n"
        "        ):\n",
        ("tests/model/test_model.py::test_the_head_runs_in_float32_under_autocast",),
        "DistilPose's 5-output head runs in bf16 under autocast (coordinates rounded to 8 bits)",
    ),
    Mutation(
        "oom_misses_cublas",
        "service/workers.py",
        '    r"CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED"\n',
        '    r"CUDA out of memory|CUDA error: out of memory"\n',
        (
            "tests/service/test_engine_gpu_decode.py::test_is_oom_knows_each_device_library_s_out_of_memory",
        ),
        "a cuBLAS allocation failure fails its batch instead of splitting it",
    ),
    Mutation(
        "bench_interrupt_unmarked",
        "bench/common.py",
        '        extra["interrupted"] = True\n',
        "        pass\n",
        ("tests/bench/test_bench_interrupt.py",),
        "a benchmark stopped by SIGINT writes its partial rows without saying so",
    ),
    Mutation(
        "fair_ties_by_name",
        "service/batching.py",
        "(served[source], head.seq, source) for source, head",
        "(served[source], 0, source) for source, head",
        ("tests/service/test_batch_cost.py::test_batches_are_formed_as_the_fairness_rule_says",),
        "equally served sources are taken in name order instead of their oldest job's",
    ),
    Mutation(
        "inner_500_plain_text",
        "service/rest.py",
        "    app.add_exception_handler(Exception, _unexpected_error)\n",
        "",
        (
            "tests/service/test_rest_errors.py::test_a_bug_in_a_route_gives_a_json_500_with_the_request_id",
        ),
        "a bug in a route inside the app answers Starlette's plain-text 500",
    ),
    Mutation(
        "threads_ignore_cgroup_limit",
        "service/serving.py",
        "    cpus = usable_cpus()\n",
        "    cpus = os.cpu_count() or 1\n",
        (
            "tests/service/test_cpu_quota.py::test_torch_threads_are_capped_at_the_limit_unless_omp_num_threads_is_set",
            "tests/service/test_cpu_quota.py::test_a_real_cgroup_limit_caps_the_served_model_threads",
        ),
        "PyTorch's threads sized by the cores the machine has, not the container's CPU limit",
    ),
    Mutation(
        "frontend_ledger_ignored",
        "service/engine_client.py",
        "            wait = load.wait_s + self._sent_s\n",
        "            wait = load.wait_s\n",
        (
            "tests/service/test_admission.py::test_a_front_end_refuses_what_would_be_late_before_decoding_it",
        ),
        "a front end forgets the work it sent since the engine's last figures and forwards what "
        "the engine then refuses",
    ),
)


def copy_tree(destination: Path) -> None:
    """Copy the files git knows (tracked and untracked-not-ignored), as they are on disk now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in sorted(set(filter(None, listed.split("\0")))):
        source = ROOT / name
        if not source.is_file():  # deleted in the working tree, or a submodule
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def last_lines(text: str, count: int = 15) -> str:
    return "\n".join(text.splitlines()[-count:])


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, str, float]:
    """pytest on ``tests`` in the copy: (exit status, its output, seconds)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    t0 = time.monotonic()
    try:
        done = subprocess.run(
            [
                *(sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"),
                *(f"--timeout={TIMEOUT_S}", *tests),
            ],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_LIMIT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return -1, f"over {RUN_LIMIT_S} s", time.monotonic() - t0
    return done.returncode, (done.stdout + done.stderr).strip(), time.monotonic() - t0


def check_copy_is_imported(copy: Path) -> None:
    """The copy's packages must shadow the editable install of the working tree."""
    probe = "import model, service, tests; print(model.__file__, service.__file__, tests.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=copy, capture_output=True, text=True, check=True
    ).stdout
    if any(not Path(p).resolve().is_relative_to(copy.resolve()) for p in out.split()):
        raise SystemExit(f"the copy is not what gets imported: {out}")


def baseline_failures(copy: Path, mutations: list[Mutation]) -> dict[tuple[str, ...], str]:
    """The test sets that fail on the unmutated copy (their mutations would prove nothing), with
    pytest's last lines. One run of every test first; each set alone only if that one fails."""
    sets = list(dict.fromkeys(m.tests for m in mutations))
    every = tuple(dict.fromkeys(t for tests in sets for t in tests))
    if not every:
        return {}
    status, _, seconds = run_tests(copy, every)
    print(f"baseline, no mutation: exit {status} in {seconds:.0f} s")
    if status == 0:
        return {}
    broken = {}
    for tests in sets:
        status, output, _ = run_tests(copy, tests)
        if status != 0:
            broken[tests] = last_lines(output)
    return broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="show how each was caught")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations: {sorted(unknown)}")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.file}: {m.what}\n    {' '.join(m.tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        check_copy_is_imported(copy)
        runnable: list[Mutation] = []
        rows: list[tuple[str, str, str, str]] = []
        for m in chosen:
            path = copy / m.file
            count = path.read_text().count(m.snippet) if path.is_file() else 0
            if count != 1:
                why = "file missing" if not path.is_file() else f"snippet found {count} times"
                print(f"SKIP {m.name}: {why} in {m.file} (the code moved: update its snippet)")
                rows.append((m.name, m.file, "not found", "-"))
                continue
            runnable.append(m)
        broken = baseline_failures(copy, runnable)
        for m in runnable:
            if m.tests in broken:
                print(f"SKIP {m.name}: its tests fail without any mutation:\n{broken[m.tests]}")
                rows.append((m.name, m.file, "tests fail unmutated", "-"))
                continue
            path = copy / m.file
            original = path.read_text()
            path.write_text(original.replace(m.snippet, m.replacement))
            try:
                status, output, seconds = run_tests(copy, m.tests)
            finally:
                path.write_text(original)
            if status == 1:
                verdict = "killed"
            elif status == 5 or (status == 0 and " passed" not in last_lines(output, 3)):
                verdict = "not run (skipped here)"
            elif status == 0:
                verdict = "SURVIVED"
            else:
                verdict = f"error (exit {status})"
            failed = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
            by = failed.group(1) if failed else "-"
            print(f"{verdict}: {m.name} ({seconds:.0f} s): {by}")
            if verdict == "SURVIVED" or verdict.startswith("error") or args.verbose:
                print(last_lines(output))
            rows.append((m.name, m.file, verdict, by))

    print("\n| mutation | file | result | caught by |\n|---|---|---|---|")
    for name, file, verdict, by in rows:
        print(f"| {name} | `{file}` | {verdict} | {by if by == '-' else f'`{by}`'} |")
    return 0 if not any(r[2] == "SURVIVED" or r[2].startswith("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
