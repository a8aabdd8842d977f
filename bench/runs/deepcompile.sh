# Issue 7: would DeepCompile close ZeRO-3's gap? The raw loop with and without it, next to FSDP and ZeroStrategy on
# the same machine; and the built-in strategy's offload row beside ZeroStrategy's.
mkdir -p /tmp/ext && tar xzf .ext/ext.tgz -C /tmp && export TORCH_EXTENSIONS_DIR=/tmp/ext
ls /usr/include/libaio.h 2>&1 | head -1
B="python3 bench/bench_gpt.py --warmup 10 --steps 50 --row-timeout 300"
$B --rows fsdp,raw_z3,zero_z3 --out $OUT/dc_ref.json --log $OUT/dc_ref.log
$B --rows raw_z3 --compile 1 --raw-config '{"compile": {"deepcompile": true}}' --out $OUT/dc_raw_z3.json --log $OUT/dc_raw_z3.log
python3 bench/bench_gpt.py --warmup 3 --steps 20 --row-timeout 200 --rows builtin_z3_offload,zero_z3_offload --out $OUT/offload_builtin.json
