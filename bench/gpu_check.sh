#!/usr/bin/env bash
# Every GPU check in one command, for a session lent a GPU machine (BENCHMARKS.md, "GPU").
#
#   bench/gpu_check.sh [OUT_DIR]                  # on the GPU machine; OUT_DIR defaults to $OUT
#   bench/gpu_check.sh --dry-run OUT_DIR          # any CPU: every step, tiny sizes (CI runs it)
#   bench/gpu_check.sh --only serve_identity,cuda_tests OUT_DIR    # rerun some steps
#
# Steps, in this order, each under `timeout` (SIGINT, then SIGKILL 15 s later, to the step's whole
# process group: the servers bench.serve starts are stopped too); a failing step does not stop the
# others, and the whole run stays inside BUDGET_S seconds (default 460: one device call, with room
# to spare under its 10-minute limit; a step that no longer fits is "skipped"; one that starts with
# less than its time box left gets what is left, and if SIGINT stops bench.model, bench.serve or
# bench.frontend, the script still writes the rows measured so far, marked "interrupted": the step
# reads "timeout" with its result file):
#   setup               carried wheels (.whl/*.whl) installed; versions, GPU, every import checked
#   weights             DistilPose-S recipe weights (tests/recipe.py), offline
#   cuda_tests          pytest -m cuda over the files that hold @pytest.mark.cuda tests (the
#                       reference models' test needs their files carried in .refcache)
#   model               bench.model: DistilPose-S and -L, fp32 and bf16, eager and CUDA graphs
#   decode              bench.decode: nvJPEG (batched) against the CPU decoders
#   serve_identity      bench.serve on the identity model: the serving path alone
#   serve_distilpose_s  bench.serve on DistilPose-S (recipe weights), bf16: the product's number
#   frontends           bench.frontend: the service with 1, 2, 4 and 8 front-end processes, on
#                       the identity model, then on DistilPose-S (recipe weights) in bf16
#   model_compile       bench.model with torch.compile (bf16): last, its cold compiles are slow
#
# Writes under OUT_DIR (a device call brings back at most 8 files; this writes 8 at most):
#   summary.md     one row per step (status ok|fail|timeout|skipped, seconds, exit code, note),
#                  the tail of each failed step's log, and every result rendered by bench.report;
#                  rewritten after every step, so a run cut short still reports what it did
#   <step>.json    the result file of each benchmark step (model, decode, serve_identity,
#                  frontends, serve_distilpose_s, model_compile)
#   logs.tar.gz    every step's full log and the CUDA tests' JUnit XML
#
# The GPU machine has no .venv and no network: python3 runs with PYTHONPATH=. (PYTHON overrides;
# a local .venv is used when present), the packages its image lacks travel as wheels in .whl, and
# the reference models' files in .refcache (BENCHMARKS.md says which, and how to prepare them).
#
# --dry-run (or DRY_RUN=1): every step on the CPU with tiny sizes; the CUDA tests are collected and
# skip themselves (no CUDA); torch.compile is disabled (TORCHDYNAMO_DISABLE=1: the flags and the
# result file are checked, not the compiler); wheels are not installed.
# tests/bench/test_gpu_check_dry_run.py runs it in CI.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

DRY=${DRY_RUN:-0}
ONLY=""
DEST=""
while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --only) ONLY=${2:-}; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) DEST=$1 ;;
  esac
  shift
done
[[ $DRY == 1 || $DRY == true ]] && DRY=1 || DRY=0
DEST=${DEST:-${OUT:-}}
if [[ -z $DEST ]]; then
  echo "gpu_check.sh: give an output folder (or set OUT)" >&2
  exit 2
fi
mkdir -p "$DEST" && DEST=$(cd "$DEST" && pwd) || exit 2

if [[ -n ${PYTHON:-} ]]; then
  PY=$PYTHON
elif [[ -x $ROOT/.venv/bin/python ]]; then
  PY=$ROOT/.venv/bin/python
else
  PY=python3
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
LOGS=$WORK/logs
SITE=$WORK/site
mkdir -p "$LOGS"
export PYTHONPATH=$ROOT PYTHONUNBUFFERED=1
if ((DRY)); then
  DEVICE=cpu
  BUDGET_S=${BUDGET_S:-300}
else
  DEVICE=cuda
  BUDGET_S=${BUDGET_S:-460}
fi
DEADLINE=$((SECONDS + BUDGET_S))
MIN_STEP_S=10
WEIGHTS=$WORK/distilpose_s.pth
STEPS=(setup weights cuda_tests model decode serve_identity serve_distilpose_s frontends
  model_compile)
ROWS=()      # "step|status|seconds|exit|result|note", in order
FAILED=()    # steps whose log tail goes into the summary
for step in ${ONLY//,/ }; do
  if [[ " ${STEPS[*]} " != *" $step "* ]]; then
    echo "gpu_check.sh: --only $step: no such step (steps: ${STEPS[*]})" >&2
    exit 2
  fi
done

selected() {  # whether step $1 runs (setup always; weights when a step needing it runs)
  [[ -z $ONLY || $1 == setup ]] && return 0
  [[ $1 == weights && ,$ONLY, == *,serve_distilpose_s,* ]] && return 0
  [[ $1 == weights && ,$ONLY, == *,frontends,* ]] && return 0
  [[ ,$ONLY, == *,$1,* ]]
}

headline() {  # one line about a step's result file (or its log), for the table
  "$PY" - "$1" "$2" <<'EOF' 2>/dev/null
import json, re, sys
step, path = sys.argv[1], sys.argv[2]
if path.endswith(".log"):
    text = open(path, errors="replace").read()
    found = re.findall(r"^=+ (.+ in [0-9.]+s.*?) =+$", text, re.M) or re.findall(r"^(\d+ \w+.* in [0-9.]+s)$", text, re.M)
    print(found[-1] if found else "")
    raise SystemExit
def n(v):  # 3 significant digits, thousands separated
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
doc = json.load(open(path))
if doc.get("interrupted"):
    print("PARTIAL (stopped by its time box): ", end="")
rows = doc["results"]
if not rows:
    print("no row measured")
    raise SystemExit
ok = [r for r in rows if r.get("status", "ok") == "ok"]
if doc["part"] == "serve":
    top = max(r["concurrency"] for r in rows)
    parts = [f"{r['target']} {n(r['throughput_rps'])} req/s p99 {n(r['p99_ms'])} ms"
             for r in rows if r["concurrency"] == top and r["round"] == 0]
    ratios = [f"{c['target']} {c['throughput_ratio']:.2f}x" for c in doc.get("comparisons", [])
              if c["concurrency"] == top and c["round"] == 0 and c["throughput_ratio"]]
    errors = sum(r["errors"] for r in rows)
    print(f"C={top}: " + "; ".join(parts) + (f"; vs naive: {', '.join(ratios)}" if ratios else "")
          + f"; {errors} errors")
elif doc["part"] == "frontend":
    top = max(r["concurrency"] for r in rows)
    print("; ".join(f"{r['target']} {r.get('model') or ''} {r['mode']} "
                    f"{n(r['requests_per_s'])} req/s" for r in rows if r["concurrency"] == top))
elif doc["part"] == "model":
    best = {}
    for r in ok:
        key = (r["model"], r["precision"], r["mode"])
        if r["crops_per_s"] > best.get(key, {}).get("crops_per_s", 0):
            best[key] = r
    cells = [f"{m} {p} {mode} {n(r['crops_per_s'])} crops/s at B={r['batch']}"
             for (m, p, mode), r in best.items()]
    print("; ".join(cells) + f"; {len(rows) - len(ok)} not ok, {len(doc.get('skipped', []))} skipped")
else:
    best = {}
    for r in ok:
        if r["images_per_s"] > best.get(r["decoder"], 0):
            best[r["decoder"]] = r["images_per_s"]
    print("; ".join(f"{d} {n(v)} images/s" for d, v in best.items()))
EOF
}

write_summary() {
  local md=$DEST/summary.md row step status json
  {
    echo "# bench/gpu_check.sh: $( ((DRY)) && echo "DRY RUN (CPU, tiny sizes)" || echo "GPU run")"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), device \`$DEVICE\`, python \`$PY\`, budget ${BUDGET_S}s," \
      "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$( [[ -n $ONLY ]] && echo ", only $ONLY")."
    echo
    echo "| step | status | seconds | exit | result | note |"
    echo "|---|---|---|---|---|---|"
    for row in "${ROWS[@]}"; do
      echo "| ${row//|/ | } |"
    done
    for step in "${FAILED[@]}"; do
      echo
      echo "## $step: the end of its log"
      echo
      echo '```'
      tail -n 30 "$LOGS/$step.log" | cut -c1-300
      echo '```'
    done
    for row in "${ROWS[@]}"; do
      IFS='|' read -r step status _ _ json _ <<<"$row"
      [[ $json == *.json && -f $DEST/$json ]] || continue
      echo
      echo "## $step"
      echo
      "$PY" -m bench.report "$DEST/$json" 2>&1
    done
  } >"$md.tmp" && mv "$md.tmp" "$md"
  tar -czf "$DEST/logs.tar.gz" -C "$WORK" logs 2>/dev/null
}

record() {  # step status seconds exit result note
  local note=${6//|//}
  ROWS+=("$1|$2|$3|$4|$5|${note:0:400}")
  [[ $2 == fail || $2 == timeout ]] && FAILED+=("$1")
  echo "== $1: $2 (${3}s, exit $4) $note"
  write_summary
}

run_step() {  # step limit_s [VAR=value ...] command...; results in $WORK/out/<step>/
  local step=$1 limit=$2 left start rc status json="-" note=""
  shift 2
  if ! selected "$step"; then
    return
  fi
  left=$((DEADLINE - SECONDS))
  if ((left < MIN_STEP_S)); then
    record "$step" skipped 0 - - "out of the ${BUDGET_S}s budget"
    return
  fi
  ((limit > left)) && limit=$left
  mkdir -p "$WORK/out/$step"
  echo "== $step (at most ${limit}s): $*" | tee "$LOGS/$step.log"
  start=$SECONDS
  timeout -s INT -k 15 "$limit" env "$@" >>"$LOGS/$step.log" 2>&1 </dev/null
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=fail ;;
  esac
  local results=("$WORK/out/$step"/*.json)
  if [[ -f ${results[0]} ]]; then
    cp "${results[0]}" "$DEST/$step.json"
    json=$step.json
    note=$(headline "$step" "$DEST/$json")
  elif [[ $step == *_tests ]]; then
    note=$(headline "$step" "$LOGS/$step.log")
  elif [[ $status == ok && $step != setup && $step != weights ]]; then
    status=fail
    note="no result file"
  fi
  if [[ $step == setup || $step == weights ]]; then
    note=$(grep -E '^(note|missing):' "$LOGS/$step.log" | sed 's/^note: //' | paste -sd ';' - | sed 's/;/; /g')
  fi
  record "$step" "$status" $((SECONDS - start)) "$rc" "$json" "$note"
}

# ------------------------------------------------------------------------------------ the steps

setup() {
  if ((DRY)); then
    echo "note: dry run: wheels not installed"
  elif compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$ROOT"/.whl/*.whl || return 1
    echo "note: $(ls "$ROOT"/.whl/*.whl | wc -l) wheels installed from .whl"
  else
    echo "note: no .whl folder: nothing installed"
  fi
  # the run folder of a service with front ends lives there (images in flight, metrics files)
  echo "note: /dev/shm $(df -h --output=size,avail /dev/shm 2>/dev/null | tail -n 1 | xargs)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
      sed 's/^/note: nvidia-smi: /'
  fi
  "$PY" - <<'EOF'
import importlib, sys
import torch
cuda = torch.cuda.is_available()
print(f"note: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"CUDA {torch.cuda.get_device_name(0) if cuda else 'not available'}")
modules = ["fastapi", "starlette", "fastapi_offline", "uvicorn", "pydantic", "pydantic_settings",
           "multipart", "httpx", "grpc", "grpc_health", "grpc_reflection", "google.protobuf",
           "prometheus_client", "PIL", "numpy", "safetensors", "orjson", "uvloop",
           "httptools", "simplejpeg", "scipy", "pytest", "pytest_asyncio",
           "pytest_timeout", "service.__main__", "service.rpc", "bench.serve"]
missing = []
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as exc:  # an old protobuf fails service.rpc's generated code, say
        missing.append(f"{name} ({type(exc).__name__}: {str(exc)[:120]})")
if missing:
    print("missing: " + "; ".join(missing))
sys.exit(1 if missing else 0)
EOF
}

cuda_test_files() {
  grep -rl --include='test_*.py' 'pytest.mark.cuda' tests | sort
}

DIR=$WORK/out

export -f setup
export PY DRY ROOT SITE
run_step setup 90 PYTHONPATH="$ROOT:$SITE" bash -c setup
if [[ -d $SITE ]]; then
  export PYTHONPATH=$ROOT:$SITE
fi

run_step weights 60 "$PY" -c \
  "from tests.recipe import write_official_checkpoint as w; w('distilpose_s', '$WEIGHTS')"

# The reference models' CUDA test needs their converted files, which the GPU machine cannot
# download: carried in .refcache (BENCHMARKS.md), else that one test skips.
REFCACHE=()
[[ -f $ROOT/.refcache/blazepose_full.safetensors ]] && REFCACHE=(POSE_CACHE_DIR="$ROOT/.refcache")
# shellcheck disable=SC2046  # one word per file
run_step cuda_tests 150 "${REFCACHE[@]}" "$PY" -m pytest -q -p no:cacheprovider -rs -m cuda \
  --junitxml="$LOGS/cuda_tests.xml" $(cuda_test_files)

if ((DRY)); then
  MODEL=(--models distilpose_s --batch-sizes 1 --precisions fp32 bf16 --warmup 0 --repeats 1
    --min-repeats 1)
  COMPILE=(--models distilpose_s --batch-sizes 1 --precisions fp32 --warmup 0 --repeats 1
    --min-repeats 1)
  DECODE=(--images 2 --width 64 --height 48 --workers 1 --batch-sizes 1 --warmup 0 --repeats 1)
  SERVE=(--concurrency 1 --duration-s 0.5 --warmup-s 0.2 --persons-max 1 --window 1
    --no-server-warmup --engine-env POSE_BACKEND=torch)
  COMPILE_ENV=(TORCHDYNAMO_DISABLE=1)
  FRONTENDS=(--targets service-1 service-2 --modes http-raw grpc-unary --concurrency 2
    --duration-s 0.5 --warmup-s 0.2 --load-processes 2 --grpc-channels 2
    --service-args=--calibration-budget-s=0)
else
  MODEL=(--models distilpose_s distilpose_l --batch-sizes 1 8 64 256 1024 --max-batch-l 256
    --precisions fp32 bf16 --warmup 5 --repeats 30 --min-repeats 5 --max-seconds 1)
  # one cold compile, the slowest part of the run (compile_s in its result): B=256 shows what
  # fusion does to throughput; batch-1 latency is the CUDA-graph rows of the model step
  COMPILE=(--models distilpose_s --batch-sizes 256 --precisions bf16 --warmup 5 --repeats 30
    --min-repeats 5 --max-seconds 1)
  DECODE=(--images 128 --workers 1 16 --batch-sizes 1 32 128 --repeats 5 --max-seconds 2)
  SERVE=(--concurrency 64 128 --duration-s 5 --warmup-s 1
    --engine-env POSE_MAX_BATCH_SIZE=64 POSE_MAX_QUEUE_SIZE=512)
  COMPILE_ENV=()
  # four load processes (one Python client caps near 3,000 gRPC calls/s a core; each starts in
  # about 0.1 s: bench.frontend_load imports no torch), four channels each: 16 connections,
  # which SO_REUSEPORT spreads over the front ends (a channel sticks to one)
  FRONTENDS=(--targets service-1 service-2 service-4 service-8 --modes http-raw grpc-unary
    --concurrency 64 256 --duration-s 3 --warmup-s 1 --load-processes 4 --grpc-channels 4
    "--service-args=--calibration-budget-s=3 --max-batch-size=64")
fi

run_step model 120 "$PY" -m bench.model --device "$DEVICE" --flip off --cuda-graphs \
  --cuda-graph-max-batch 64 "${MODEL[@]}" --out-dir "$DIR/model"
run_step decode 60 "$PY" -m bench.decode --device "$DEVICE" "${DECODE[@]}" --out-dir "$DIR/decode"
run_step serve_identity 120 "$PY" -m bench.serve --device "$DEVICE" --model identity \
  "${SERVE[@]}" --out-dir "$DIR/serve_identity"
run_step serve_distilpose_s 150 "$PY" -m bench.serve --device "$DEVICE" --model distilpose_s \
  --weights "$WEIGHTS" --precision bf16 "${SERVE[@]}" --out-dir "$DIR/serve_distilpose_s"
# the identity model first (the plumbing's ceiling), then DistilPose-S in bf16 (where the GPU
# stops the growth; batches of up to 64 images, 192 crops, as serve_distilpose_s): one result
# file; a time box that ends it keeps the rows measured
run_step frontends 240 "$PY" -m bench.frontend --device "$DEVICE" "${FRONTENDS[@]}" \
  --models identity distilpose_s --weights "$WEIGHTS" --precision bf16 --out-dir "$DIR/frontends"
run_step model_compile 180 "${COMPILE_ENV[@]}" "$PY" -m bench.model --device "$DEVICE" \
  --flip off --compile on "${COMPILE[@]}" --out-dir "$DIR/model_compile"

FAILS=0
for row in "${ROWS[@]}"; do
  IFS='|' read -r _ status _ <<<"$row"
  [[ $status == ok ]] || FAILS=$((FAILS + 1))
done
echo "== done in ${SECONDS}s: $((${#ROWS[@]} - FAILS)) of ${#ROWS[@]} steps ok; $DEST/summary.md"
((FAILS == 0))
