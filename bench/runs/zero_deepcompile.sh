# Issue 7: ZeroStrategy(compile="deepcompile") at stage 3 (and 2) next to FSDP and the eager rows on one machine.
# DeepCompile compiles the 0.9B GPT twice (its passes switch at step 5) and builds its CUDA op on a fresh machine:
# give each row several minutes. Run the GPU tests first (parity of the same path on a small model).
mkdir -p /tmp/ext && tar xzf .ext/ext.tgz -C /tmp && export TORCH_EXTENSIONS_DIR=/tmp/ext
python3 tests/gpu/test_deepcompile.py 2>&1 | tee $OUT/gpu_dc_tests.log
B="python3 bench/bench_gpt.py --warmup 10 --steps 50 --row-timeout 420"
$B --rows zero_z3,zero_z2 --zero-kwargs '{"compile": "deepcompile"}' --out $OUT/zero_dc.json --log $OUT/zero_dc.log
$B --rows fsdp,zero_z3,zero_z2 --out $OUT/zero_dc_ref.json --log $OUT/zero_dc_ref.log
