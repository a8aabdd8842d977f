# Issue 6 runs on one H100: the largest-model micro-batch (stage 3 + CPU optimizer offload, activation checkpointing)
# and the pinned / unpinned A/B of the 0.9B offload row. Run from the repo root with the wheels installed.
export TORCH_EXTENSIONS_DIR=/tmp/ext
L="python3 bench/bench_gpt.py --rows zero_z3_offload --d-model 4096 --n-layer 30 --n-head 32 --warmup 2 --steps 3 --row-timeout 330 --grad-ckpt 1"
$L --micro-batch 32 --zero-config '{"zero_optimization":{"stage3_module_granularity_threshold":30000000}}' --out $OUT/large_b32.json --log $OUT/large_b32.log
B="python3 bench/bench_gpt.py --warmup 3 --steps 20 --row-timeout 200"
$B --rows raw_z3_offload,zero_z3_offload --out $OUT/offload_default.json --log $OUT/offload_default.log
$B --rows zero_z3_offload --zero-kwargs '{"pin_memory": true}' --out $OUT/offload_pin.json
tar czf $OUT/ext.tgz -C /tmp ext
