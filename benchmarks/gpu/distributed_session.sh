#!/usr/bin/env bash
# Issue 8's 2-GPU result, on a 2-GPU machine (nvidia-h200-x2 / nvidia-h100-x2): LoRA training steps on one
# GPU, on two data-parallel, and on two with the frozen blocks sharded (FSDP2), on the same global batches.
# Rows go to $OUT/distributed.jsonl; the losses of each shape's three runs must agree, and tokens/s should
# come near 2x. NVLink multicast stays off, as the device notes ask.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step() { timeout "$1" "${@:2}" --output "$OUT/distributed.jsonl" 2>&1 | grep "^{\|Error\|error" ; }
for spec in "llama-3.2-1b --micro 8 --seq 1024" "llama-3.1-8b --micro 4 --seq 2048 --checkpointing"; do
  # shellcheck disable=SC2086 # spec holds several arguments
  step 170 python3 -m benchmarks.distributed_step --shape $spec --global-micro 2 --warmup 3 --steps 10
  step 170 torchrun --standalone --nproc_per_node 2 -m benchmarks.distributed_step --shape $spec --global-micro 2 \
    --warmup 3 --steps 10
  step 170 torchrun --standalone --nproc_per_node 2 -m benchmarks.distributed_step --shape $spec --global-micro 2 \
    --warmup 3 --steps 10 --shard
done
