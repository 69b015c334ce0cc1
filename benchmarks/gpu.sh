#!/usr/bin/env bash
# The GPU measurements recorded in docs/performance.md, in one device call, after the carries are unpacked:
#   ../shared/device/prepare-carry.sh .carry && ../shared/device/prepare-fa4-carry.sh .fa4   (on the workstation)
#   call 1, carry [".fa4/a"]:                     bash .fa4/a/stage.sh
#   call 2, carry [".fa4/b", ".carry"]:           bash benchmarks/gpu.sh "$OUT" smoke parity
#   (on a fresh machine parity does not fit one call: smoke parity-fa4, then parity-flashinfer, each about 4-5 min)
#   call 3 (same machine):                        bash benchmarks/gpu.sh "$OUT" attention
#   (attention-sync: fa4 against both dense kernels with the host's work per call counted; see timing.py)
#   call 4 (same machine):                        bash benchmarks/gpu.sh "$OUT" pipeline compiled
#   latency scaling (docs/figures): call 1, then  bash benchmarks/gpu.sh "$OUT" scaling
#   (Wan 2.1's attention at 81/161/321/481 frames, s=1 and 0.5, dense cuDNN and dense FA4 against every driver)
#   declared families on the GPU: call 2 with `families` (each family's small model with 64-channel heads in
#   bfloat16 beyond its horizon, every layer call against the float64 reference, through every CUDA driver)
#   WanAnimate2's generation pass: call 2 with `wan-animate-2` (its compiled flex BlockMask against lvsa's path;
#   it needs only the .carry folder: the recorded run skipped this script's FA4 activation, see docs/performance.md)
# (one part can take most of a 10-minute call: smoke, parity and compiled together did not fit in one)
# Each part writes its log (and JSON) to the output folder; a failing part does not stop the next.
set -u
out=${1:?usage: gpu.sh OUTDIR [smoke parity parity-fa4 parity-flashinfer attention attention-sync scaling pipeline compiled ring ceiling families wan-animate-2]}
shift
parts=${*:-smoke parity attention pipeline compiled}
export PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=9.0
source .fa4/b/activate.sh || exit 3
[ -d /tmp/site/flashinfer ] || bash .carry/unpack-carry.sh .carry >/dev/null
python -m pip install -q --no-deps --no-build-isolation --target /tmp/lvsa --upgrade . >/dev/null
export PYTHONPATH=/tmp/lvsa:/tmp/site:$PYTHONPATH
# the benchmarks run as a package from a folder holding only a link to them: the repository root on the path
# would put the source folder lvsa/ (without its drivers) in place of the installed lvsa
mkdir -p /tmp/bench && ln -sfn "$PWD/benchmarks" /tmp/bench/benchmarks
bench() { (cd /tmp/bench && python -m "benchmarks.$1" "${@:2}"); }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python -c "import torch, flashinfer, flash_attn.cute as f; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'flashinfer', flashinfer.__version__, 'fa4', getattr(f, '__version__', '?'))"
python -P -c "import sys; from lvsa.cli import main; sys.exit(main(['drivers', '--device', 'cuda']))" 2>&1 | tail -8
for part in $parts; do
  echo "=== $part"
  case $part in
    smoke) bench attention --small --cases wan-2x,text --methods fa4 --repeats 2 2>&1 | tee "$out/smoke.txt" ;;
    parity) LVSA_TEST_DEVICES=cuda LVSA_TEST_DTYPES=bfloat16,float16 python -P -m pytest -q -p no:cacheprovider \
              tests/parity tests/backends -k "fa4 or (flashinfer and bfloat16)" 2>&1 | tail -25 | tee "$out/parity.txt" ;;
    # the same two halves, one call each on a fresh machine (FlashInfer compiles its kernels first)
    parity-fa4) LVSA_TEST_DEVICES=cuda LVSA_TEST_DTYPES=bfloat16,float16 python -P -m pytest -q -p no:cacheprovider \
              tests/parity tests/backends -k "fa4" 2>&1 | tail -25 | tee "$out/parity-fa4.txt" ;;
    parity-flashinfer) LVSA_TEST_DEVICES=cuda LVSA_TEST_DTYPES=bfloat16 python -P -m pytest -q -p no:cacheprovider \
              tests/parity tests/backends -k "flashinfer" 2>&1 | tail -25 | tee "$out/parity-flashinfer.txt" ;;
    attention) bench attention --warmup 1 --repeats 30 --flashinfer-direct --json "$out/attention.json" \
                 2>&1 | tee "$out/attention.txt" ;;
    attention-sync) bench attention --warmup 1 --repeats 10 --methods fa4 --timing synchronized \
                      --json "$out/attention-sync.json" 2>&1 | tee "$out/attention-sync.txt" ;;
    scaling) bench attention --sweep-frames 81 161 321 481 --sweep-scales 1.0 0.5 --methods split,flashinfer,fa4 \
               --warmup 1 --repeats 15 --json "$out/scaling.json" 2>&1 | tee "$out/scaling.txt" ;;
    pipeline) bench pipeline --models wan --frames 81 321 --dense-fa4 --json "$out/pipeline.json" 2>&1 \
                | grep -v "should be kept in float32" | tee "$out/pipeline.txt" ;;
    ring) bench ring_compute --json "$out/ring.json" 2>&1 | tee "$out/ring.txt"
          LVSA_TEST_DEVICES=cuda LVSA_TEST_DTYPES=bfloat16,float16 python -P -m pytest -q -p no:cacheprovider \
              tests/parity/test_ring_parity.py 2>&1 | tail -8 | tee -a "$out/ring.txt" ;;
    ceiling) bench fa4_ceiling --warmup 1 --repeats 10 --json "$out/ceiling.json" 2>&1 | tee "$out/ceiling.txt" ;;
    families) LVSA_TEST_DEVICES=cuda python -P -m pytest -q -p no:cacheprovider tests/test_families.py -k accelerator \
                2>&1 | tail -25 | tee "$out/families.txt" ;;
    wan-animate-2) bench wan_animate_2 --segment-frames 81 161 321 --repeats 5 2>&1 \
                | grep -v "should be kept in float32" | tee "$out/wan-animate-2.txt" ;;
    compiled) bench compiled --frames 321 --layers 4 --steps 6 --methods fa4 sdpa 2>&1 \
                | grep -v "should be kept in float32" | tee "$out/compiled.txt" ;;
  esac
done
