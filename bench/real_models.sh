#!/usr/bin/env bash
# Real-weight runs on an H100/H200 GPU machine that has no network: stage by stage, each well under 10 minutes.
#
#   bench/real_models.sh receive PART_FILE...   copy split pieces of a GGUF file into $MODELS (one call per ~58 MiB)
#   bench/real_models.sh assemble NAME SHA256   join $MODELS/NAME.part_* into NAME.gguf, check it, convert to bf16
#   bench/real_models.sh niah NAME              NIAH single / multi-key / multi-value, 4K-32K x 5 depths x 3 seeds
#   bench/real_models.sh ruler NAME             RULER-lite tasks and a gamma sweep at 32K
#   bench/real_models.sh recall NAME TOKENS     captured attention mass vs density: ours, the oracle and two peers
#   bench/real_models.sh e2e NAME               TTFT of the trained model and of Llama-3.1-8B (random weights) with
#                                               the per-layer densities NAME chose at 32K
#   bench/real_models.sh start JOB 'COMMANDS'   run commands (stages) in the background, detached from the call that starts it
#                                               (a machine stays up only between calls): stages that use the GPU
#                                               queue on one lock, so timings never overlap; logs in /root/runs/logs
#   bench/real_models.sh logs                   the tail of every background job's log
#   bench/real_models.sh collect                every run's results and logs, packed into $OUT
#
# Stages for the selection and long-context measurements (bench/RESULTS.md says which command made which table):
#   prepare NAME SHA256                         wait for $MODELS/NAME.complete (touch it after the last piece),
#                                               then assemble + convert as `assemble` does; CPU only, no GPU lock
#   retrieval NAME RUN ARGS...                  wait for NAME to be prepared, then bench/bench_retrieval.py ARGS on
#                                               it under the GPU lock, results in /root/runs/RUN
#   e2e-densities JSON RUN ARGS...              bench/bench_e2e.py on Llama-3.1-8B with those per-layer densities
#   serving NAME RUN ARGS...                    bench/bench_serving.py on NAME (continuous batching, transformers serve)
#   vllm NAME RUN ARGS...                       the vLLM backend's tests and bench/bench_vllm.py on NAME (vLLM's
#                                               wheels in $VWHEELS, or sent as pieces: vreceive; the machine's own
#                                               transformers)
#   vllm-bench NAME RUN ARGS...                 bench/bench_vllm.py alone (vLLM's site as for vllm)
#   vllm-test NAME RUN                          the backend's engine test alone (FLASH_ATTN against CUSTOM at gamma 1)
#   load NAME RUN FAMILY ARGS...                bench/bench_load.py on NAME for FAMILY (vllm: vLLM's site; transformers:
#                                               the serving wheels of .gpu/whl), results in /root/runs/RUN
#   vreceive PART_FILE...                       copy pieces of the vLLM wheels' tar into /root/vpieces (`touch
#                                               /root/vpieces/.complete` after the last; VSHA256 names its checksum)
#   kernel RUN ARGS...                          bench/bench_kernel.py ARGS under the GPU lock, results in /root/runs/RUN
#   profile [--tag T] [--variant V | --kernel-file F] N:DENSITY...
#                                               Nsight Compute stall profile of one kernel launch per case
#                                               (bench/profile_kernel.py, 8B attention shape), in /root/runs/profile
#
# A session: the first call receives piece 0 and starts `prepare` and one `start`ed chain of GPU stages; later
# calls send the other pieces, then poll with `sleep N; logs; collect`. A machine that sits idle between calls
# is given back with everything on it, jobs and results included: send the next call at once, and `collect`
# in every poll so that what finished has come back.
# The gguf reader travels as a wheel in .gpu/whl (pip download gguf==0.19.0); bench/gpu_wheels.txt lists the wheels of
# transformers serve (WHEELS) and of vLLM (vreceive) as a session carried them, and how to download them. Results are packed into one
# archive under $OUT (or ./out) so they come back as one file.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-/root/models}
RESULTS=${OUT:-./out}
mkdir -p "$MODELS" "$RESULTS"
if [ -d "${WHEELS:-.gpu/whl}" ] && ! [ -e /root/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/site "${WHEELS:-.gpu/whl}"/*.whl \
        && touch /root/site/.installed
fi
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1
cli() { python3 -m sparse_prefill.cli "$@" --no-progress; }
pack() { tar czf "$RESULTS/$1.tgz" -C "$2" . && ls -la "$RESULTS"; }

gpu_locked() { flock /root/gpu.lock "$@"; }

# vLLM's wheels in /root/vsite, once: from $VWHEELS, or from the pieces `vreceive` collects (waited for), a tar
# checked against $VSHA256; then the package itself, so that vLLM finds the backend through its entry point.
vllm_site() {
    if ! [ -e /root/vsite/.installed ]; then
        local wheels=${VWHEELS:-}
        if [ -z "$wheels" ]; then
            until [ -e /root/vpieces/.complete ]; do sleep 2; done
            cat /root/vpieces/v.part_* > /root/v.tar
            [ -z "${VSHA256:-}" ] || echo "$VSHA256  /root/v.tar" | sha256sum -c -
            mkdir -p /root/vwhl && tar xf /root/v.tar -C /root/vwhl && rm /root/v.tar
            wheels=$(dirname "$(find /root/vwhl -name 'vllm-*.whl' | head -1)")
        fi
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/vsite \
            "$wheels"/*.whl && touch /root/vsite/.installed
    fi
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /dev/null
}

stage=$1; shift
case "$stage" in
start)
    job=$1; shift
    mkdir -p /root/runs/logs
    # A copy of the tree, so that later calls refreshing the working tree cannot touch a running job.
    [ -d /root/repo ] || cp -r "$PWD" /root/repo
    (cd /root/repo && setsid nohup bash -c "$*" > "/root/runs/logs/$job.log" 2>&1 < /dev/null &)
    echo "started $job: $*" ;;
logs)
    for f in /root/runs/logs/*.log; do echo "== $f"; tail -n 6 "$f"; done; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv ;;
collect)
    tar czf "$RESULTS/runs.tgz" --exclude='*.safetensors' -C /root runs && ls -la "$RESULTS" ;;
prepare)
    # pieces NAME.part_* of the GGUF, or NAMEgz.part_* of it gzipped (fewer pieces to send)
    name=$1 sha=$2
    until [ "$(ls "$MODELS/$name".part_* "$MODELS/${name}gz".part_* 2>/dev/null | wc -l)" -gt 0 ] \
        && [ -e "$MODELS/$name.complete" ]; do sleep 2; done
    if ls "$MODELS/${name}gz".part_* > /dev/null 2>&1; then
        cat "$MODELS/${name}gz".part_* | gunzip -c > "$MODELS/$name.gguf" && rm "$MODELS/${name}gz".part_*
    else
        cat "$MODELS/$name".part_* > "$MODELS/$name.gguf" && rm "$MODELS/$name".part_*
    fi
    echo "$sha  $MODELS/$name.gguf" | sha256sum -c -
    python3 -c "from sparse_prefill.eval.models import to_safetensors; to_safetensors('$MODELS/$name.gguf', '$MODELS/$name')"
    touch "$MODELS/$name.ready"; echo "ready $name" ;;
retrieval)
    name=$1 run=$2; shift 2
    until [ -e "$MODELS/$name.ready" ]; do sleep 2; done
    mkdir -p "/root/runs/$run"
    gpu_locked env OUT="/root/runs/$run" python3 bench/bench_retrieval.py --model "$MODELS/$name" "$@" ;;
serving)
    # serving NAME RUN ARGS...: bench/bench_serving.py on the prepared model (transformers >= 5.25 comes as a wheel)
    name=$1 run=$2; shift 2
    until [ -e "$MODELS/$name.ready" ]; do sleep 2; done
    mkdir -p "/root/runs/$run"
    gpu_locked env OUT="/root/runs/$run" python3 bench/bench_serving.py --model "$MODELS/$name" "$@" \
        2>&1 | tee "/root/runs/$run/bench_serving.log" ;;
vllm-test)
    # vllm-test NAME RUN: the backend's engine test alone (a real engine each for FLASH_ATTN and CUSTOM, same tokens)
    name=$1 run=$2
    until [ -e "$MODELS/$name.ready" ]; do sleep 2; done
    mkdir -p "/root/runs/$run"
    vllm_site
    export PYTHONPATH=/root/vsite:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
    gpu_locked env SPARSE_PREFILL_VLLM_MODEL="$MODELS/$name" python3 -m pytest -q tests/test_vllm_backend.py \
        -k engine 2>&1 | tee "/root/runs/$run/pytest.log" ;;
vllm|vllm-bench)
    # vllm NAME RUN ARGS...: the vLLM backend's GPU tests, then bench/bench_vllm.py ARGS, on the prepared model
    # (vllm-bench: the benchmark alone). vLLM's wheel and the dependencies the machine lacks are installed to
    # /root/vsite (`vllm_site`), so that the transformers serving wheels above stay out of vLLM's way.
    name=$1 run=$2; shift 2
    until [ -e "$MODELS/$name.ready" ]; do sleep 2; done
    mkdir -p "/root/runs/$run"
    vllm_site
    export PYTHONPATH=/root/vsite:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
    [ "$stage" = vllm-bench ] || gpu_locked env SPARSE_PREFILL_VLLM_MODEL="$MODELS/$name" python3 -m pytest -q \
        tests/test_vllm_backend.py 2>&1 | tee "/root/runs/$run/pytest.log"  # (test_vllm_plugin.py: CPU, in CI)
    gpu_locked env OUT="/root/runs/$run" python3 bench/bench_vllm.py --models "$MODELS/$name" "$@" \
        2>&1 | tee "/root/runs/$run/bench_vllm.log" ;;
load)
    # load NAME RUN FAMILY ARGS...: bench/bench_load.py on the prepared model, one family's engines (their servers
    # need different sites: vLLM's own, or the transformers serving wheels of .gpu/whl in /root/site).
    name=$1 run=$2 family=$3; shift 3
    until [ -e "$MODELS/$name.ready" ]; do sleep 2; done
    mkdir -p "/root/runs/$run"
    if [ "$family" = vllm ]; then
        vllm_site
        export PYTHONPATH=/root/vsite:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
        engines=vllm:FLASH_ATTN,vllm:CUSTOM
    else
        engines=transformers:dense,transformers:sparse
    fi
    gpu_locked env OUT="/root/runs/$run" python3 bench/bench_load.py --model "$MODELS/$name" --engines "$engines" \
        "$@" 2>&1 | tee "/root/runs/$run/bench_load.log" ;;
vreceive)
    mkdir -p /root/vpieces && cp "$@" /root/vpieces/ && ls -la /root/vpieces ;;
e2e-densities)
    json=$1 run=$2; shift 2
    mkdir -p "/root/runs/$run"
    gpu_locked env OUT="/root/runs/$run" python3 bench/bench_e2e.py --arch llama-3.1-8b --densities "$json" "$@" ;;
kernel)
    run=$1; shift; mkdir -p "/root/runs/$run"
    gpu_locked env OUT="/root/runs/$run" python3 bench/bench_kernel.py "$@" 2>&1 | tee "/root/runs/$run/bench_kernel.log" ;;
profile)
    # profile [--tag TAG] [--variant V | --kernel-file FILE] N:DENSITY...  (TAG names the output files)
    out=/root/runs/profile; mkdir -p "$out"; tag=default; which=()
    while [ "${1:-}" != "${1#--}" ]; do
        case $1 in --tag) tag=$2 ;; --variant|--kernel-file) which+=("$1" "$2") ;; esac; shift 2
    done
    stalls='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio'
    for case in "$@"; do
        args=(--n "${case%%:*}" --density "${case##*:}" "${which[@]}")
        gpu_locked python3 bench/profile_kernel.py "${args[@]}" --launches 10 | tee "$out/time_${case}_$tag.txt"
        gpu_locked ncu --clock-control none -k regex:_block_sparse_attention_kernel -s 3 -c 1 \
            --section WarpStateStats --section SchedulerStats --section Occupancy --section SpeedOfLight \
            --section LaunchStats --metrics "$stalls" --print-details all python3 bench/profile_kernel.py "${args[@]}" \
            > "$out/ncu_${case}_$tag.txt" 2>&1 || echo "ncu failed for $case (see $out/ncu_${case}_$tag.txt)"
    done ;;
receive)
    cp "$@" "$MODELS/" && ls -la "$MODELS" ;;
assemble)
    name=$1 sha=$2
    cat "$MODELS/$name".part_* > "$MODELS/$name.gguf"
    echo "$sha  $MODELS/$name.gguf" | sha256sum -c -
    rm "$MODELS/$name".part_*
    time python3 -c "from sparse_prefill.eval.models import to_safetensors; to_safetensors('$MODELS/$name.gguf', '$MODELS/$name')"
    nvidia-smi --query-gpu=name,memory.total --format=csv ;;
niah)
    name=$1; out=/root/runs/$name/niah
    for task in niah_single niah_multikey niah_multivalue; do
        cli niah --model "$MODELS/$name" --task "$task" --lengths 4k,8k,16k,32k --seeds 3 --haystack prose \
            --out "$out/$task"
    done
    pack "niah-$name" "$out" ;;
ruler)
    name=$1; out=/root/runs/$name/ruler
    cli ruler --model "$MODELS/$name" --lengths 32k --out "$out/ruler"
    cli sweep --model "$MODELS/$name" --task niah_single --lengths 32k --gammas 0.8,0.9,0.95,0.99 --out "$out/sweep"
    pack "ruler-$name" "$out" ;;
recall)
    name=$1 tokens=$2; out=/root/runs/$name/recall-$tokens
    python3 -m sparse_prefill.cli recall --model "$MODELS/$name" --tokens "$tokens" --out "$out"
    pack "recall-$name-$tokens" "$out" ;;
e2e)
    name=$1; out=/root/runs/$name/e2e; mkdir -p "$out"
    python3 bench/bench_e2e.py --model "$MODELS/$name" --model-lengths 8k,16k,32k --repeats 3 \
        --arch llama-3.1-8b --lengths 32k,64k,128k --densities /root/runs/$name/niah/niah_single/density.json \
        --attention 2>&1 | tee "$out/bench_e2e.log"
    cp -f "$RESULTS"/bench_e2e.json "$out/" 2>/dev/null || true
    pack "e2e-$name" "$out" ;;
*)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
