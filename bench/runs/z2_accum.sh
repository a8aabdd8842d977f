# Issue 14, stages 1-2 eager on one H200: DeepSpeed's fp32 gradient partition (data_types.grad_accum_dtype=fp32),
# alone and without overlap_comm, against the default, with FSDP rows interleaved (run H, session 12).
B="python3 bench/bench_hf.py --warmup 10 --steps 40 --row-timeout 120"
FP32='{"data_types":{"grad_accum_dtype":"fp32"}}'
$B --rows fsdp,zero_z2 --out $OUT/h_default_a.json --log $OUT/h_default_a.log
$B --rows zero_z2,zero_z1 --zero-config "$FP32" --out $OUT/h_fp32.json --log $OUT/h_fp32.log
$B --rows fsdp --out $OUT/h_fsdp_b.json --log $OUT/h_fsdp_b.log
$B --rows zero_z2 --zero-config '{"data_types":{"grad_accum_dtype":"fp32"},"zero_optimization":{"overlap_comm":false}}' --out $OUT/h_fp32_noov.json --log $OUT/h_fp32_noov.log
$B --rows zero_z2,fsdp --out $OUT/h_default_c.json --log $OUT/h_default_c.log
