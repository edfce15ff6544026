#!/usr/bin/env bash
# Issue 20's GPU figures in one call of the device tool, each unfog beside diffusers in one process:
#   run(command="bash benchmarks/gpu_issue20.sh", carry=[".whl"], timeout_s=600)
# .whl holds the wheels the device image lacks (diffusers 0.42.1 and importlib_metadata), made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# Parts, in the order given (default: eager compiled sdxl fused batch; about 11 minutes in all, so
# one 10-minute call takes the first three or four and a second call the rest):
#   eager     SD 1.5 txt2img, 512 px, 20 steps, fp16: eager, then eager with fused QKV
#   compiled  the same through torch.compile (CUDA graphs) on both sides
#   sdxl      SDXL base txt2img, 1024 px, 30 steps, fp16, eager
#   fused     the U-Net CFG step, fused QKV against separate projections, SD 1.5 and SDXL
#   batch     SD 1.5 txt2img, batch 8: throughput in images/s
# Each part is capped by `timeout`; every table goes to stdout and $OUT.
# A dry run on the CPU with tiny models checks the script without a GPU:
#   PYTHON=.venv/bin/python DEVICE=cpu DTYPE=fp32 QUICK=1 bash benchmarks/gpu_issue20.sh
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3} device=${DEVICE:-cuda} dtype=${DTYPE:-fp16} quick=${QUICK:+--quick}
if [ "$device" = cuda ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
parts=${*:-eager compiled sdxl fused batch}
common="--device $device --dtypes $dtype $quick"
step() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo; echo "## $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" | grep -v '^  '
}
for part in $parts; do
    case $part in
        fused) step fused_qkv 150 $py benchmarks/fused_qkv.py $common --models sd15 sdxl --runs 20 ;;
        eager) step txt2img_eager 90 $py benchmarks/txt2img.py $common --runs 5
               step txt2img_eager_fused 90 $py benchmarks/txt2img.py $common --runs 5 --fuse-qkv ;;
        compiled) step txt2img_compiled 240 $py benchmarks/txt2img.py $common --runs 5 --compile ;;
        sdxl) step txt2img_sdxl 200 $py benchmarks/txt2img.py $common --model sdxl --runs 3 ;;
        batch) step txt2img_batch8 90 $py benchmarks/txt2img.py $common --runs 3 --batch 8 ;;
        *) echo "unknown part $part: eager, compiled, sdxl, fused or batch"; exit 2 ;;
    esac
done
