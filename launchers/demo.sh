#!/usr/bin/env bash
# The embedded demo: tokenize the bundled Shakespeare sample and train the tiny MoE model (8 experts, top-2,
# expert parallel over 2 processes; CPU + gloo without a GPU) through the deepspeed launcher. Extra arguments are
# config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do  # help before anything is deleted or launched (the launcher would print it once per rank)
  case "$arg" in
    -h|--help)
      echo "usage: launchers/demo.sh [section.key=value ...]"
      echo "Tokenizes data/shakespeare-train.jsonl.gz once, then trains configs/tiny-moe.yaml on 2 processes"
      echo "(a fresh runs/tiny-moe each time). The overrides are launchers/pretrain.py's:"
      echo
      exec python launchers/pretrain.py --help
      ;;
  esac
done
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
if [ ! -f data/processed/shakespeare_text_document.idx ]; then
  python tools/preprocess_data.py --input data/shakespeare-train.jsonl.gz \
    --output-prefix data/processed/shakespeare --train-tokenizer --vocab-size 4000
fi
rm -rf runs/tiny-moe  # a fresh run each time (the demo's checkpoints and logs live there)
deepspeed --num_gpus 2 launchers/pretrain.py --config configs/tiny-moe.yaml "$@"
cat <<'NEXT'

Outputs in runs/tiny-moe: loss.png (training and validation loss), expert_load.png (each MoE layer's load per
expert over training; white = balanced), metrics.jsonl, console.log, config.yaml, deepspeed.json, checkpoints/.
Next:
  deepspeed --num_gpus 2 tools/evaluate.py --config configs/tiny-moe.yaml checkpoint.load=runs/tiny-moe/checkpoints
  python tools/convert_checkpoint.py --load runs/tiny-moe/checkpoints --save hf/tiny-moe   # MixtralForCausalLM
NEXT
