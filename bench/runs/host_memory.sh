# Issue 6: peak host memory (resident set of the row's process) of the CPU-offload rows, against the estimator.
mkdir -p /tmp/ext && tar xzf .ext/ext.tgz -C /tmp && export TORCH_EXTENSIONS_DIR=/tmp/ext
O="python3 bench/bench_gpt.py --rows zero_z3_offload --warmup 2 --steps 5 --row-timeout 330"
$O --d-model 4096 --n-layer 30 --n-head 32 --micro-batch 4 --out $OUT/host_6b.json --log $OUT/host_6b.log
$O --out $OUT/host_1b.json
$O --zero-kwargs '{"offload_parameters": "cpu"}' --out $OUT/host_1b_params.json
grep -h '"host_peak_gib"' $OUT/*.json
