#!/usr/bin/env bash
# One lent-GPU session in one command: build the extension with its CUDA kernels, run the GPU
# tests, then the GPU benchmarks, each phase bounded so that the whole fits one device call.
#
#   OUT=/tmp/gpu [PHASES="build test_triton_op ..."] bash benchmarks/gpu_session.sh [budget_seconds]
#
# PHASES (default: all, in the order below) picks the phases to run. The extension is built on the
# device unless python/posttrain_kernels/ holds one for the device's Python (built beforehand with
# PTK_CUDA_ARCHS=90 and carried along), which saves the minutes of nvcc.
#
# Peers that the machine lacks (Liger-Kernel, Cut Cross-Entropy) are installed from wheels in
# .whl/ when present (pip download --no-deps ... -d .whl). Everything lands under $OUT/res (logs,
# junit XML, bench CSV/Markdown) and is packed into $OUT/results.tgz after every phase, so a
# phase cut off by its bound loses only itself.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${1:-540}
START=$(date +%s)
RES=$OUT/res
mkdir -p "$RES"

ALL="build test_triton_op probe tvd probe_compile test_gpu test_triton bench_linear budget bench_logits bench_families"
PHASES=${PHASES:-$ALL}
want() { case " $PHASES " in *" $1 "*) return 0 ;; esac; return 1; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
pack() { tar czf "$OUT/results.tgz" -C "$OUT" res 2>/dev/null; }
# phase NAME MAX_SECONDS CMD...: runs CMD under min(MAX, time left - 10 s), logs to $RES/NAME.log
phase() {
  local name=$1 max=$2; shift 2
  local t; t=$(left); t=$(( t - 10 < max ? t - 10 : max ))
  if [ "$t" -lt 20 ]; then echo "== $name: skipped, $t s left"; return; fi
  echo "== $name (bound ${t}s, $(( $(date +%s) - START ))s in)"
  local t0; t0=$(date +%s)
  timeout -k 5 "$t" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s"; tail -n "${TAIL:-6}" "$RES/$name.log" | cut -c1-240
  pack
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
  nvcc --version | tail -2; nproc; } > "$RES/env.txt" 2>&1
cat "$RES/env.txt"

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

# sm_90 only: the lent machines are Hoppers, and one architecture halves the nvcc time
SUFFIX=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
if [ -f "python/posttrain_kernels/_C$SUFFIX" ]; then
  echo "prebuilt extension _C$SUFFIX: not rebuilt"
  PTK_SKIP_EXTENSION=1 TAIL=3 phase install 60 python3 -m pip install --no-build-isolation --no-deps --no-index -e .
else
  want build && PTK_CUDA_ARCHS=${PTK_CUDA_ARCHS:-90} CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) TAIL=3 \
    phase build 240 python3 -m pip install -v --no-build-isolation --no-deps --no-index -e .
fi
python3 -c "import posttrain_kernels as p; from posttrain_kernels.dispatch import live_backends as l; print('live', l())" \
  2>&1 | tee "$RES/live.txt"

# the ops as torch.library.triton_ops: inductor compiles and runs each family's kernels, opcheck on
# CUDA tensors (the CPU half of the file, the subprocess trace, runs in CI)
want test_triton_op && OMP_NUM_THREADS=1 TAIL=12 phase test_triton_op 150 python3 -m pytest -q -p no:cacheprovider \
  -n 8 -k "${TRITON_OP_TESTS:-inductor or opcheck or registration}" tests/test_triton_op.py --junitxml="$RES/test_triton_op.xml"

want probe && TAIL=40 phase probe 60 python3 -m benchmarks.gpu_probe
want tvd && TAIL=20 phase tvd 30 python3 -m benchmarks.gpu_probe_tvd
want probe_compile && TAIL=12 phase probe_compile 120 python3 -m benchmarks.gpu_probe_compile

want test_gpu && TAIL=12 phase test_gpu 100 python3 -m pytest -q -p no:cacheprovider --maxfail=30 tests/test_gpu.py \
  --junitxml="$RES/test_gpu.xml"

# the suites whose Triton cases run under the interpreter on the CPU, now compiled for the GPU on
# CUDA tensors
want test_triton && OMP_NUM_THREADS=1 TAIL=8 phase test_triton 100 python3 -m pytest -q -p no:cacheprovider -n 12 \
  -k "triton or cuda" tests/test_token_logprobs.py tests/test_cross_entropy.py \
  tests/test_linear_token_logprobs.py tests/test_linear_vocab_blocks.py tests/test_linear_policy.py \
  tests/test_linear_preference.py tests/test_linear_distill.py tests/test_distill.py \
  tests/test_policy_loss.py --junitxml="$RES/test_triton.xml"


# issue 3's GPU target: log-probs + entropy from hidden states, bf16, 16384 x 4096 x 131072
LINEAR="--device cuda --linear-rows 16384 --hidden 4096 --vocab 131072 --linear-dtypes bfloat16 --no-compile"
want bench_linear && TAIL=14 phase bench_linear 120 python3 -m posttrain_kernels bench $LINEAR \
  --ops linear_logprobs+entropy,linear_cross_entropy --repeats 5 --warmup 2 --csv "$RES/linear.csv"
# the chunk budget around the GPU default (512 MiB)
want budget && for mib in 256 1024; do
  POSTTRAIN_KERNELS_CHUNK_BYTES=$(( mib << 20 )) TAIL=4 phase "budget_$mib" 45 python3 -m posttrain_kernels bench \
    $LINEAR --ops linear_logprobs+entropy --impls "ptk triton" --repeats 5 --warmup 2 --csv "$RES/budget_$mib.csv"
done

# the foundation issue's GPU target: % of copy bandwidth at 16384 x 128256 bf16
want bench_logits && TAIL=14 phase bench_logits 75 python3 -m posttrain_kernels bench --device cuda \
  --ops logprobs,logprobs+entropy,cross_entropy --rows 16384 --vocab 128256 --dtypes bfloat16 \
  --no-compile --repeats 10 --warmup 3 --csv "$RES/logits.csv"

want bench_families && TAIL=30 phase bench_families 130 python3 -m posttrain_kernels bench --device cuda \
  --ops linear_dpo,linear_orpo,linear_simpo,linear_kto,linear_grpo,distill_jsd,linear_distill_jsd \
  --rows 8192 --vocab 128256 --linear-rows 8192 --pref-shape 4,1024,4096 --policy-shape 8,1024,4096 \
  --distill-hidden 2048,4096 --no-compile --repeats 5 --warmup 2 --csv "$RES/families.csv"
pack
echo "== done in $(( $(date +%s) - START ))s"
