# Issue 14, stages 1-2 eager on one H200 after _compat.deepspeed.write_gradients_into_partition (session 12):
# FSDP interleaved with stage 2 and stage 1, a stage-3 row, then a profiled stage-2 row (phases, syncs, kernels).
# Run I: the first version (a bf16 gradient partition); run J: the fp32 partition (no cast in the step).
B="python3 bench/bench_hf.py --warmup 10 --steps 40 --row-timeout 120"
$B --rows fsdp,zero_z2,zero_z1,fsdp,zero_z2,zero_z1,fsdp,zero_z2,zero_z3 --out $OUT/eager.json --log $OUT/eager.log
python3 bench/bench_hf.py --warmup 3 --steps 10 --profile 2 --row-timeout 120 --rows zero_z2 --out $OUT/profile.json --log $OUT/profile.log
