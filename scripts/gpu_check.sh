#!/usr/bin/env bash
# The GPU checks of the fast path, as one script for a machine with one CUDA GPU (no internet needed).
#
#   OUT=<dir> DATA=<data dir> bash scripts/gpu_check.sh [seconds]
#
# Stages, each under its own time limit and all within [seconds] (default 420):
#   pytest    pytest -m gpu (fast path, eager / compiled / CUDA graphs, plain and concat = fp32 reference
#             losses, tiny model)
#   bench     peft-bench, eager, bert-base shape, B=32 and 8, L=128, the CASES (each timed with our full
#             step interleaved: ratio_vs_our_full)
#   profile   peft-bench --profile, eager, B=32, the PROFILE_CASES, each vs full: op tables (host and
#             device time) to $OUT/profile/, kernels a step and GPU-busy ms in the rows
#   sites     python -m peft_lightning.arena_bench: each arena site's forward and backward, plain
#             against concat, at 5120 and 20480 rows (the bench step's at B=8 and 32: 5 passes x B x 128)
#   graphs    peft-bench, encoder compiled with mode reduce-overhead (CUDA graphs), the COMPILED_CASES vs full
#   compiled  peft-bench, encoder compiled (default mode), the COMPILED_CASES vs full
#   train     a short MiniLM LoRA run (2000 rows a task, 2 epochs): fp32 unfused reference, then the fast
#             path (bf16-mixed, fused passes, the arena), eager
#   train_compiled  the same run with the encoder compiled as well (budget=paper's path)
# STAGES picks and orders them (default "pytest bench profile graphs compiled train"); CASES the eager bench
# cases, PROFILE_CASES the profiled ones (default "lora_r8 lora_r8_concat": the arena plain and with its
# folded updates), COMPILED_CASES the compiled ones (default "lora_r8 lora_r8_concat": LoRA's plain and
# concatenated forms under compile), COMPILED_BATCH their batch sizes (default "32 8"), PYTEST_K a
# pytest -k expression for the pytest stage (default: all; "eager" runs the eager tests only).
# Writes $OUT/log.txt, $OUT/bench.jsonl and $OUT/train-{ref,fast,compiled}.json (their results.json).
set -u
OUT=${OUT:-gpu_check}
DATA=${DATA:-data}
BUDGET=${1:-420}
STAGES=${STAGES:-pytest bench profile graphs compiled train}
CASES=${CASES:-full lora_r8 lora_r8_concat lora_r8_no_arena frozen prefix_p4_mlp lora_r64 prefix_p4}
PROFILE_CASES=${PROFILE_CASES:-lora_r8 lora_r8_concat}
COMPILED_CASES=${COMPILED_CASES:-lora_r8 lora_r8_concat}
COMPILED_BATCH=${COMPILED_BATCH:-32 8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
start=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - start))); }
step() { # step <max seconds> <name> <command...>
    local max=$1 name=$2
    shift 2
    local t
    t=$(left)
    ((t > max)) && t=$max
    if ((t < 30)); then
        echo "== $name: skipped, $(left) s left"
        return
    fi
    echo "== $name (limit $t s) $(date +%T)"
    timeout -k 5 "$t" "$@"
    echo "== $name: exit $? after $(($(date +%s) - start)) s"
}
train_run() { # train_run <max seconds> <variant> <overrides...>: a short MiniLM LoRA run, its results.json to $OUT
    local max=$1 v=$2
    shift 2
    step "$max" "train-$v" python3 -m peft_lightning.train study="gpu_$v" model=minilm data.dir="$DATA" adapter=lora \
        data.limit_train=2000 trainer.max_epochs=2 trainer=gpu_fast "$@"
    local f
    f=$(find "outputs/gpu_$v" -name results.json 2>/dev/null | head -1)
    [ -n "$f" ] && cp "$f" "$OUT/train-$v.json"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, peft, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)"
    for stage in $STAGES; do
        case $stage in
        pytest) step 120 pytest-gpu python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fastpath.py ${PYTEST_K:+-k "$PYTEST_K"} ;;
        bench) step 180 bench-eager python3 -m peft_lightning.bench --device cuda --model bert_base \
            --batch-sizes 32 8 --length 128 --cases $CASES --out "$OUT/bench.jsonl" ;;
        profile) step 120 bench-profile python3 -m peft_lightning.bench --device cuda --model bert_base \
            --batch-sizes 32 --length 128 --cases $PROFILE_CASES --steps 5 --warmup 2 \
            --profile "$OUT/profile" --out "$OUT/bench.jsonl" ;;
        sites) step 60 arena-sites python3 -m peft_lightning.arena_bench --device cuda --rows 5120 20480 ;;
        graphs) step 360 bench-graphs python3 -m peft_lightning.bench --device cuda --model bert_base \
            --batch-sizes $COMPILED_BATCH --length 128 --cases $COMPILED_CASES --compile \
            --compile-mode reduce-overhead --out "$OUT/bench.jsonl" ;;
        train)
            train_run 120 ref trainer.precision=32-true model.fuse_passes=false
            train_run 150 fast model.fuse_passes=true data.pad_to_multiple_of=16
            ;;
        train_compiled) train_run 200 compiled model.fuse_passes=true model.compile=true data.pad_to_multiple_of=16 ;;
        compiled) step 360 bench-compiled python3 -m peft_lightning.bench --device cuda --model bert_base \
            --batch-sizes $COMPILED_BATCH --length 128 --cases $COMPILED_CASES --compile --out "$OUT/bench.jsonl" ;;
        esac
    done
    echo "== done after $(($(date +%s) - start)) s"
} 2>&1 | tee "$OUT/log.txt"
