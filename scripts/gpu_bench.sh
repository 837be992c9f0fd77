#!/usr/bin/env bash
# Issue 5 on a GPU: the CUDA tests, then the paper-size U-Net ([256, 512, 1024], random weights:
# per-call timing) and the shipped Lift checkpoint (iteration counts, deviation), each sequential
# eager vs sequential compiled vs Picard variants, side by side. Results (JSON + Markdown) go to
# benchmarks/results/<machine>-* and, when $OUT is set (the device tool), to $OUT as well.
#   scripts/gpu_bench.sh [tests] [random] [lift] [tune]   (no argument: all four)
#   MACHINE=h100 scripts/gpu_bench.sh lift             (default name: from the GPU)
# Each compiled variant builds its CUDA graph on first use (tens of seconds per new shape): give
# each stage its own call where a call is limited to 10 minutes.
# Wheels for packages the machine lacks: scripts/device_wheels.sh, carried as .whl. Observations:
# the windows shipped with the checkpoint (checkpoints/lift/observations.safetensors).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
machine=${MACHINE:-$(python3 -c "import torch; n = torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else n.replace(' ', '-').lower())")}
out=benchmarks/results
stages=${*:-tests random lift tune}
for stage in $stages; do
    case $stage in
    tests)  # a failure is recorded and the benchmarks still run
        python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$out/$machine-test_cuda.txt" 2>&1 || true
        tail -n 3 "$out/$machine-test_cuda.txt" ;;
    random)
        python3 -m paradiffpolicy.bench.sampler device=cuda checkpoint=random "down_dims=[256,512,1024]" "windows=[8,16,32]" \
            tols=[0.1] "inits=[copy,rollout]" "backends=[eager,compile]" trials=20 warmup=3 dev_samples=0 \
            machine="$machine" out="$out/$machine-random-paper.json" ;;
    lift)
        python3 -m paradiffpolicy.bench.sampler device=cuda checkpoint=checkpoints/lift "windows=[8,16,32]" "tols=[0.1,0.01,0.005]" \
            "inits=[rollout]" "backends=[eager,compile]" trials=20 warmup=3 dev_samples=128 machine="$machine" \
            out="$out/$machine-lift.json" ;;
    tune)  # the fastest setting within 1e-2 on this GPU, eager vs jit vs the same-backend sequential sampler
        python3 -m paradiffpolicy.tune checkpoint=checkpoints/lift device=cuda "backends=[eager,jit]" write=false \
            progress=false output_dir="/tmp/tune-$machine" hydra.run.dir="/tmp/tune-$machine/hydra"
        cp "/tmp/tune-$machine/tune_report.json" "$out/$machine-tune-lift.json" ;;
    *) echo "unknown stage $stage (tests, random, lift, tune)" >&2; exit 2 ;;
    esac
done
if [ -n "${OUT:-}" ]; then cp "$out/$machine"-* "$OUT/"; fi
