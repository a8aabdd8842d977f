# Issue 7: ZeRO-3 with each GPT Block as one fetch unit (ZeroStrategy's default since this run) against FSDP, the raw
# loop and the built-in strategy; the same units named as leaf modules (DeepSpeed's slower path without the
# granularity threshold); then the offload row twice, interleaved with the raw loop, for its run-to-run spread.
mkdir -p /tmp/ext && tar xzf .ext/ext.tgz -C /tmp && export TORCH_EXTENSIONS_DIR=/tmp/ext
B="python3 bench/bench_gpt.py --warmup 5 --steps 50 --row-timeout 200"
$B --rows fsdp,raw_z3,builtin_z3,zero_z3 --out $OUT/z3_blocks.json --log $OUT/z3_blocks.log
$B --rows zero_z3 --zero-config '{"zero_optimization": {"leaf_module": {"names": ["model.blocks.0", "model.blocks.1", "model.blocks.2", "model.blocks.3", "model.blocks.4", "model.blocks.5", "model.blocks.6", "model.blocks.7", "model.blocks.8", "model.blocks.9", "model.blocks.10", "model.blocks.11", "model.blocks.12", "model.blocks.13", "model.blocks.14", "model.blocks.15"]}}}' --out $OUT/z3_leaf_names.json
O="python3 bench/bench_gpt.py --warmup 3 --steps 20 --row-timeout 200"
$O --rows raw_z3_offload,zero_z3_offload,raw_z3_offload,zero_z3_offload --out $OUT/offload_repeat.json --log $OUT/offload_repeat.log
