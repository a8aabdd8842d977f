# Issue 14, stages 1-2 eager on one H200 after _compat.deepspeed.write_gradients_into_partition (session 12).
# Run I: gradients added into a bf16 partition in the hooks; run J: into an fp32 partition in the hooks (stage 2
# peak +0.78 GiB); run K (this script): gradients kept in param.grad, one fp32 foreach copy at the boundary.
# FSDP interleaved with stage 2 and stage 1.
B="python3 bench/bench_hf.py --warmup 10 --steps 40 --row-timeout 120"
$B --rows fsdp,zero_z2,zero_z1,fsdp,zero_z2,zero_z1,fsdp,zero_z2 --out $OUT/eager.json --log $OUT/eager.log
