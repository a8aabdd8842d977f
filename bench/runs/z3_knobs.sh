B="python3 bench/bench_gpt.py --warmup 5 --steps 30 --row-timeout 200"
$B --rows zero_z3 --out $OUT/z3_default.json --log $OUT/z3_default.log
$B --rows zero_z3 --zero-config '{"zero_optimization":{"stage3_module_granularity_threshold":6000000}}' --out $OUT/z3_gran.json --log $OUT/z3_gran.log
$B --rows zero_z3 --zero-config '{"zero_optimization":{"stage3_prefetch_bucket_size":500000000}}' --out $OUT/z3_prefetch.json
$B --rows zero_z3 --zero-config '{"zero_optimization":{"overlap_comm":false}}' --out $OUT/z3_nooverlap.json
$B --rows raw_z3,zero_z3 --out $OUT/z3_again.json
python3 bench/bench_gpt.py --warmup 3 --steps 2 --rows raw_z3,zero_z3 --mem-trace $OUT/mt --out $OUT/mt.json
for f in raw_z3 zero_z3; do ls -la $OUT/mt/; done
python3 bench/mem_peak.py $OUT/mt/raw_z3.pickle $OUT/mt/zero_z3.pickle --depth 4 --top 25
