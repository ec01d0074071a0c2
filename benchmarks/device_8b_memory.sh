#!/usr/bin/env bash
# Device job (one GPU): a Llama-3.1-8B-shaped random bf16 checkpoint generated on the device, the
# `gsq plan` prediction for it, then `gsq quantize` of its first block(s) with the gpu preset's
# windows (fewer steps: memory depends on the windows, not on the step count) and the peak host /
# GPU memory measured. Results (plan.json, report.json, time.txt) go to $OUT.
#   bash benchmarks/device_8b_memory.sh TOKENIZER_DIR BLOCKS
set -e
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
tok=${1:?tokenizer folder} blocks=${2:-2}
python3 - "$tok" <<'PY'
import sys, time
from transformers import AutoTokenizer
from gsq.models.synthetic import random_config, write_random_checkpoint
t0 = time.time()
cfg = random_config("llama3", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=131072)
write_random_checkpoint("/root/r8b", cfg, AutoTokenizer.from_pretrained(sys.argv[1]), seed=0)
print("generated in", round(time.time() - t0, 1), "s")
PY
flags="--method gsq --max-blocks $blocks --device cuda --preset gpu --epochs 1 --qk-steps 20 --e2e-epochs 0"
python3 -m gsq.cli plan /root/r8b $flags --json "$OUT/plan.json" | tail -n 20
/usr/bin/time -v -o "$OUT/time.txt" python3 -m gsq.cli quantize /root/r8b $flags --out /root/q8b \
  > "$OUT/quantize.log" 2>&1
cp /root/q8b/report.json "$OUT/report.json"
grep -E "Maximum resident|Elapsed" "$OUT/time.txt"
