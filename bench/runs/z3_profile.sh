# Issue 7: where ZeRO-3's time goes once each Block is one fetch unit (phase times, GPU idle, host syncs), next to
# FSDP and stage 2 on the same machine; then stage 3 with compile=True.
mkdir -p /tmp/ext && tar xzf .ext/ext.tgz -C /tmp && export TORCH_EXTENSIONS_DIR=/tmp/ext
python3 bench/bench_gpt.py --rows fsdp,zero_z2,zero_z3 --warmup 3 --steps 15 --profile 3 --out $OUT/z3_profile.json --log $OUT/z3_profile.log
python3 bench/bench_gpt.py --rows zero_z3 --compile 1 --warmup 5 --steps 50 --out $OUT/z3_compile.json --log $OUT/z3_compile.log
