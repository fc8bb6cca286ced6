#!/usr/bin/env bash
# The video / optical-flow rows of the zoo sweep, run side by side on a many-core machine (each
# model in its own worker process, 2 threads each), plus the new layer types on CUDA when a GPU
# is there. Writes one JSON and one log per model into ${WORK:-/tmp/zoo_video} and packs them into
# $OUT/video_sweep.tgz when OUT is set; merge them into benchmarks/zoo_results.json with
# `python benchmarks/zoo_table.py --merge DIR --machine "…"`.
set -u
WORK=${WORK:-/tmp/zoo_video}
mkdir -p "$WORK"
export PYTHONPATH=$PWD ZOO_THREADS=2 ZOO_MEMORY_GB=30 PYTHONUNBUFFERED=1
PY=${PY:-python3}
for spec in r3d_18:video mc3_18:video r2plus1d_18:video s3d:video mvit_v1_b:video mvit_v2_s:video \
            swin3d_t:video raft_small:optical_flow; do
  name=${spec%%:*}; family=${spec#*:}; family=${family/_/ }
  timeout "${ZOO_LIMIT:-520}" "$PY" benchmarks/zoo_table.py --worker "$name" "$family" "$WORK/$name.json" \
    > "$WORK/$name.log" 2>&1 &
done
if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  timeout "${ZOO_LIMIT:-520}" "$PY" -m pytest -q -p no:cacheprovider tests/methods/test_layer_types_cuda.py \
    > "$WORK/cuda_tests.log" 2>&1 &
fi
wait
tail -n 3 "$WORK"/*.log
if [ -n "${OUT:-}" ]; then tar czf "$OUT/video_sweep.tgz" -C "$WORK" .; fi
