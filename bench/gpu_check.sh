#!/usr/bin/env bash
# The whole GPU check in one command (issue 12), run from the repository root:
#
#   bash bench/gpu_check.sh [OUT_DIR]                  # on a machine with CUDA: under 8 minutes
#   bash bench/gpu_check.sh --cpu [OUT_DIR]            # the same stages with tiny shapes on the CPU (CI runs it)
#   bash bench/gpu_check.sh --bundle-only "$OUT"       # through the device tool: 3 files in $OUT (see below)
#
# Stages, each logged to OUT_DIR/<stage>.log with its exit status, each time-boxed; a failed stage does
# not stop the later ones:
#   env         the machine: GPU, driver, Python and library versions, cores, memory
#   wheels      installs the wheels carried in .whl/ (faiss-cpu, hnswlib, gguf; bench/README.md says how
#               to prepare them) into a private folder on PYTHONPATH; a backend whose library is
#               missing is skipped, with a line saying so (nothing on the core path needs them)
#   tests       the test suite's device tests on CUDA (pytest -m 'device and cuda'; on the CPU with --cpu)
#   device_map  bench/device_map.py: the layers split between cuda:0 and the CPU with accelerate
#   bench_32k   retrieval-attn bench, Llama-3-8B shape in bf16, --gpu-memory-gib 24, 32K tokens: sketch
#               (first stage on the GPU, exact second stage on the CPU from pinned rows), sketch-gather
#               (the candidates' rows gathered to the GPU), roar, full attention (uncapped),
#               transformers' offloaded cache, flat (in that order: each measurement is written as it
#               ends, so a time box cuts the least wanted)
#   bench_128k  the same at 128K, in what is left of the run's time box
# Then OUT_DIR/summary.txt (a table), OUT_DIR/summary.json and OUT_DIR/gpu_check.tar.gz (every log,
# table and JSON); the exit status is 0 when every stage passed. With --bundle-only the logs are
# written to a temporary folder and OUT_DIR receives those three files alone (the device tool brings
# back at most 8 files). The summary and the benchmark tables are also printed at the end.
# Environment: GPU_CHECK_STAGES=tests,bench_128k runs only the stages it lists; GPU_CHECK_PYTEST_ARGS
# adds pytest arguments (CI passes --collect-only: its own run of the suite runs these tests);
# GPU_CHECK_SECONDS is the whole run's time box (470). Every model has random weights (the embedded
# GGUF model is too large to carry). The project runs from this folder (PYTHONPATH=.), not installed.
# OUT_DIR defaults to $OUT (the device tool's folder), else results/gpu_check.
set -u

mode=gpu
bundle_only=0
while [ $# -gt 0 ]; do
    case $1 in
        --cpu) mode=cpu ;;
        --bundle-only) bundle_only=1 ;;
        -*) echo "usage: bash bench/gpu_check.sh [--cpu] [--bundle-only] [OUT_DIR]" >&2; exit 2 ;;
        *) break ;;
    esac
    shift
done
dest=${1:-${OUT:-results/gpu_check}}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
if [ "$bundle_only" = 1 ]; then
    out=$(mktemp -d /tmp/gpu_check.XXXXXX)
else
    out=$dest
fi
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
python=${PYTHON:-python3}
site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
deadline=${GPU_CHECK_SECONDS:-470}  # the whole run, under 8 minutes
start=$SECONDS
statuses=()

if [ "$mode" = gpu ]; then
    device=cuda
    tests_m="device and cuda"  # the cpu cases of the device tests run in CI
    bench_common=(--device cuda --shape llama3-8b --dtype bfloat16 --gpu-memory-gib 24 --prefill-chunk 4096)
    bench_32k=(--contexts 32768 --steps 16 --warmup 2)
    bench_128k=(--contexts 131072 --steps 6 --warmup 1)
    dm_args=(--device cuda:0 --shape small --context 4096)
    caps=(env:20 wheels:40 tests:150 device_map:60 bench_32k:150)
else
    device=cpu
    tests_m="device and not cuda"
    bench_common=(--device cpu --shape tiny --dtype float32 --prefill-chunk 512 --sink 16 --window 64 --top-k 32)
    bench_32k=(--contexts 1024 --steps 4 --warmup 1)
    bench_128k=(--contexts 2048 --steps 4 --warmup 1)
    dm_args=(--device cpu --shape tiny --context 512)
    caps=(env:20 wheels:20 tests:240 device_map:60 bench_32k:120)  # six methods at 1K tokens
fi

cap_of() {  # cap_of STAGE: the stage's own time box, in seconds
    local pair
    for pair in "${caps[@]}"; do
        if [ "${pair%%:*}" = "$1" ]; then echo "${pair#*:}"; return; fi
    done
    echo 0
}

run_stage() {  # run_stage NAME COMMAND...: log to $out/NAME.log, time-boxed by its cap and the deadline
    local name=$1
    shift
    if [ -n "${GPU_CHECK_STAGES:-}" ] && [[ ",$GPU_CHECK_STAGES," != *",$name,"* ]]; then
        return  # not asked for: GPU_CHECK_STAGES lists the stages to run (default: all)
    fi
    local left=$((deadline - (SECONDS - start)))
    local cap
    cap=$(cap_of "$name")
    if [ "$cap" -le 0 ] || [ "$cap" -gt "$left" ]; then cap=$left; fi
    local log="$out/$name.log" t0=$SECONDS rc
    if [ "$cap" -lt 5 ]; then
        echo "skipped: the run's ${deadline}s were spent" >"$log"
        rc=skipped
    else
        echo "== $name (time box ${cap}s): $*" >"$log"
        if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
            timeout --kill-after=10 "$cap" bash -c "$1" >>"$log" 2>&1
        else
            timeout --kill-after=10 "$cap" "$@" >>"$log" 2>&1
        fi
        rc=$?
        [ "$rc" = 124 ] && echo "timed out after ${cap}s" >>"$log"
    fi
    echo "exit status: $rc" >>"$log"
    statuses+=("$name $rc $((SECONDS - t0))")
    printf '%-11s exit %-7s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$log"
}

env_report() {
    echo "mode: $mode, repository: $root, output: $out"
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$python" - <<'EOF'
import os, platform
import accelerate, numba, numpy, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__}, numba {numba.__version__} "
      f"(threading layer set on first use), numpy {numpy.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}")
print(f"CPU cores usable: {len(os.sched_getaffinity(0))} of {os.cpu_count()}")
with open("/proc/meminfo") as f:
    print("".join(line for _, line in zip(range(3), f)), end="")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"CUDA {torch.version.cuda}: {torch.cuda.device_count()} device(s), {p.name}, {p.total_memory / 2**30:.1f} GiB")
else:
    print("CUDA: not available")
EOF
}

install_wheels() {
    local rc=0
    if compgen -G ".whl/*.whl" >/dev/null; then
        if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl; then
            echo "installed into $site: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
        else
            echo "pip could not install the wheels in .whl/"
            rc=1
        fi
    else
        echo "no .whl/ folder here: nothing installed (bench/README.md says how to carry faiss-cpu, hnswlib and gguf)"
    fi
    "$python" - <<'EOF'
import importlib.util
from retrieval_attn.index import available_indexes
missing = []
for backend, module in (("ivf", "faiss"), ("hnsw", "hnswlib"), ("GGUF model loading", "gguf")):
    found = importlib.util.find_spec(module) is not None
    print(f"{backend}: {'available' if found else f'skipped: the {module} library is missing'}")
    missing += [] if found else [backend]
print(f"index backends available: {[name for name in available_indexes() if name not in missing]}")
EOF
    return $rc
}

export -f env_report install_wheels
export mode root out python site
if [ -d "$site" ] || compgen -G ".whl/*.whl" >/dev/null; then
    export PYTHONPATH="$PYTHONPATH:$site"
fi

echo "gpu_check ($mode): logs in $out"
if [ "$mode" = gpu ] && ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA device here: run 'bash bench/gpu_check.sh --cpu' on a CPU-only machine" | tee "$out/env.log"
    statuses+=("env no-cuda 0")
else
    run_stage env env_report
    run_stage wheels install_wheels
    # shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS: extra pytest arguments, split on spaces
    run_stage tests "$python" -m pytest -m "$tests_m" -q -rs -p no:cacheprovider \
        --junitxml="$out/tests.xml" ${GPU_CHECK_PYTEST_ARGS:-} tests
    run_stage device_map "$python" bench/device_map.py "${dm_args[@]}" --out "$out/device_map"
    # sketch first: its figures are the targets (and its two placements are to be chosen between),
    # should a time box cut a stage; roar, the CPU-search design, next
    methods=(sketch sketch-gather roar full offloaded flat)
    run_stage bench_32k "$python" bench/decode.py "${bench_common[@]}" "${bench_32k[@]}" --methods "${methods[@]}" \
        --out "$out/bench_32k"
    run_stage bench_128k "$python" bench/decode.py "${bench_common[@]}" "${bench_128k[@]}" --methods "${methods[@]}" \
        --out "$out/bench_128k"
fi

total=$((SECONDS - start))
failed=0
{
    printf '%-11s %-8s %7s  %s\n' stage status seconds log
    for entry in "${statuses[@]}"; do
        read -r name rc secs <<<"$entry"
        [ "$rc" = 0 ] || failed=1
        printf '%-11s %-8s %7s  %s\n' "$name" "$rc" "$secs" "$name.log"
    done
    echo "total: ${total}s ($mode)"
} >"$out/summary.txt"
"$python" - "$out" "$mode" "$total" "${statuses[@]}" <<'EOF'
import json, sys
out, mode, total, entries = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
stages = [dict(zip(("stage", "status", "seconds"), e.split())) for e in entries]
for s in stages:
    s["seconds"] = int(s["seconds"])
    s["log"] = f"{s['stage']}.log"
ok = all(s["status"] == "0" for s in stages)
json.dump({"mode": mode, "ok": ok, "total_seconds": total, "stages": stages}, open(f"{out}/summary.json", "w"), indent=2)
EOF
# written outside $out (which may be $dest) and moved in: an archive growing inside the folder it reads
# makes tar stop with "file changed as we read it"
bundle=$(mktemp)
tar -czf "$bundle" -C "$out" --exclude=gpu_check.tar.gz . && mv "$bundle" "$dest/gpu_check.tar.gz"
if [ "$bundle_only" = 1 ]; then
    cp "$out/summary.txt" "$out/summary.json" "$dest/"
fi
for log in "$out"/bench_*.log "$out"/device_map.log; do  # the tables, for whoever reads only the output
    [ -f "$log" ] && { echo; echo "== $(basename "$log")"; grep -v -e '^warm-up' -e '^context [0-9]*: ' "$log" | tail -n 40; }
done
[ -f "$out/tests.log" ] && { echo; echo "== tests.log"; tail -n 15 "$out/tests.log"; }
echo
cat "$out/summary.txt"
echo "results: $dest (summary.txt, summary.json, gpu_check.tar.gz)"
exit $failed
