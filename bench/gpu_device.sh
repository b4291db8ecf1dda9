#!/usr/bin/env bash
# Issues 7 and 18's GPU figures on a lent device machine, in two halves (that machine has no network).
#
#   bash bench/gpu_device.sh fetch   # here: the wheels its image lacks -> .whl/ (git-ignored, ~19 MB)
#   bash bench/gpu_device.sh check   # here: the same install into a scratch folder + a CPU plumbing run
#   bash bench/gpu_device.sh run     # there: install .whl/ into /tmp/site, run the GPU benchmarks, then
#                                    # the CUDA tests in the time left (tests/test_cuda.py);
#                                    # copy docs/benchmarks.md, the JSONs and the log to $OUT
#
# With the device tool: run(command="bash bench/gpu_device.sh run", carry=[".whl"], timeout_s=590),
# then give_back, then copy the returned benchmarks.md over docs/benchmarks.md here. In order: the
# training step (fp32, bf16; ~1.5 min), the build sweep of batch sizes and speed levers (stops
# starting configurations at DHF_BENCH_GPU_BUDGET seconds, default 270), the SDXL and DINOv2
# builds (~2 min), then the CUDA tests in the time left. A shorter run: DHF_DEVICE_ONLY=gpu
# (benchmarks), DHF_BENCH_GPU_CONFIGS=8,32+cl and DHF_BENCH_GPU_BUDGET=200 (seconds),
# DHF_DEVICE_TESTS='pinned or levers' (pytest -k), DHF_DEVICE_DEADLINE=300 (seconds in all).
#
# The device image ('cuda', python3 = Python 3.12 with torch, transformers 5.x, huggingface_hub 1.x,
# numpy, scikit-image, matplotlib, typer ...; /work/.library/device/KINDS.md) lacks diffusers,
# zarr and pydantic. Only those and their missing dependencies travel, pinned as in
# constraints.txt, plus a wheel of dhf-cache itself; torch and everything else stay the image's.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the device image lacks (name==version as in constraints.txt). Binary ones for CPython 3.12.
WHEELS=(diffusers importlib_metadata zarr numcodecs donfig google-crc32c pydantic pydantic_core
        annotated-types typing-inspection)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)
PY=${PYTHON:-.venv/bin/python}

pin() {  # name==version from constraints.txt (names compared case- and -/_-insensitively)
    local want line
    want=$(echo "$1" | tr 'A-Z_' 'a-z-')
    while IFS= read -r line; do
        [[ $line == \#* || -z $line ]] && continue
        if [[ $(echo "${line%%==*}" | tr 'A-Z_' 'a-z-') == "$want" ]]; then echo "$line"; return; fi
    done < constraints.txt
    echo "bench/gpu_device.sh: $1 is not pinned in constraints.txt" >&2; exit 2
}

fetch() {
    rm -rf .whl && mkdir -p .whl
    local specs=() p platform_args=()
    for p in "${WHEELS[@]}"; do specs+=("$(pin "$p")"); done
    for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platform_args[@]}" -d .whl "${specs[@]}"
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl . >/dev/null
    rm -rf build  # setuptools' scratch folder (git-ignored)
    ls -1 .whl
    du -sh .whl
}

install() {  # $1: target folder
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" .whl/*.whl
}

preflight() {  # everything the GPU benchmark imports, and what it will run on
    # -P: not the repository's dhf_cache/ folder (no pipelines/ in it) but the installed wheel
    python3 -P - <<'EOF'
import diffusers, numcodecs, pydantic, torch, transformers, zarr
import dhf_cache.pipelines.build  # noqa: F401  (the wheel's package-dir mapping works)
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
print(f"python ok: torch {torch.__version__} ({cuda}), diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, zarr {zarr.__version__}, pydantic {pydantic.__version__}",
      flush=True)
EOF
}

case "${1:-}" in
fetch)
    fetch ;;
check)  # the device's recipe against a python3 that has no project packages (e.g. PATH=/tmp/devsim/bin:$PATH)
    [[ -d .whl ]] || fetch
    site=$(mktemp -d) && trap 'rm -rf "$site"' EXIT
    install "$site"
    export PYTHONPATH=$site PYTHONUNBUFFERED=1
    preflight
    python3 bench/gpu_batches.py --device cpu --dtype float32 --model tiny --image-size 64 --steps 5 \
        --configs 1,2+cl+attn=math,2+compile=default --compile-backend eager --images 4 --json "$site/gpu.json"
    python3 bench/gpu_train_step.py --device cpu --size 32/16/8 --steps 2 --unet-calls 0
    python3 bench/gpu_sources.py --device cpu --tiny --images 4 --batch-size 2
    PYTHONSAFEPATH=1 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_matching.py -k cuda ;;
run)
    [[ -d .whl ]] || { echo "no .whl/ here: run 'bash bench/gpu_device.sh fetch' first and carry .whl" >&2; exit 2; }
    deadline=${DHF_DEVICE_DEADLINE:-570}  # seconds this script may take (a device command may take 600)
    out=${OUT:-bench-out}
    mkdir -p "$out"
    install /tmp/site
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    # not PYTHONSAFEPATH here: bench/*.py import bench/_common.py from their own folder; only
    # pytest below needs it (python3 -m must import the installed wheel, not the source folder)
    preflight 2>&1 | tee "$out/gpu.log"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$out/gpu.log" || true
    rc=0
    # the benchmarks first (the issue's figures), then the CUDA tests in the time that is left
    DHF_BENCH_GPU_BUDGET=${DHF_BENCH_GPU_BUDGET:-270} python3 bench/run_all.py \
        --only "${DHF_DEVICE_ONLY:-gpu-train,gpu,gpu-sources}" 2>&1 | tee -a "$out/gpu.log" || rc=$?
    cp docs/benchmarks.md "$out/benchmarks.md"
    for f in gpu gpu-train gpu-sources; do
        if [[ -f bench-out/$f.json ]]; then cp "bench-out/$f.json" "$out/$f.json"; fi
    done
    left=$((deadline - SECONDS))
    if ((left > 60)); then
        echo "== CUDA tests (tests/test_cuda.py, the CUDA test of tests/test_matching.py; ${left} s left)" | tee -a "$out/gpu.log"
        PYTHONSAFEPATH=1 timeout "$left" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_matching.py \
            -k "${DHF_DEVICE_TESTS:-cuda}" 2>&1 \
            | tee -a "$out/gpu.log" || rc=$?
    else
        echo "== CUDA tests skipped: ${left} s left" | tee -a "$out/gpu.log"
    fi
    exit "$rc" ;;
*)
    sed -n '2,15p' "$0"; exit 2 ;;
esac
