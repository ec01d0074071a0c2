#!/usr/bin/env bash
# Device job (H200): accuracy-table pieces (benchmarks/accuracy_table.py, gpu preset) in three parallel
# streams, plus a Llama-3.1-8B-shaped random checkpoint generated on the device and quantized with
# `gsq quantize --method gsq --max-blocks 2 --device cuda` (streamed). Results under /root/acc.
# Run detached from the repo root after the model is joined at /root/smollm2.gguf (RESULTS §12).
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
mkdir -p /root/acc
stream() {  # name, then pieces "method bits seed"
  local name=$1; shift
  local piece
  for piece in "$@"; do
    read -r m b s <<<"$piece"
    echo "=== $(date +%T) start $m $b $s" >> /root/acc/$name.log
    python3 benchmarks/accuracy_table.py --preset gpu --device cuda --methods $m --bits $b \
      --seeds $s --model /root/smollm2.gguf --data /root/data --json /root/acc/$name.json \
      >> /root/acc/$name.log 2>&1
    echo "=== $(date +%T) end $m $b $s rc=$?" >> /root/acc/$name.log
  done
}
stream A "gsq 2 0" "gsq 3 1" "rtn 2 0" "gsq 4 0" &
stream B "gsq 2 1" "gsq 3 0" "rtn 3 0" "gsq 4 1" &
stream C "gptq 2 0" "gptq 2 1" "gptq 3 0" "gptq 3 1" "rtn 2 1" "rtn 3 1" "gptq 4 0" "gptq 4 1" "rtn 4 0" "rtn 4 1" &
(
  python3 - > /root/acc/r8b.log 2>&1 <<'PY'
import time, torch
from transformers import AutoTokenizer
from gsq.models.synthetic import random_config, write_random_checkpoint
t0 = time.time()
tok = AutoTokenizer.from_pretrained("/root", gguf_file="smollm2.gguf")
cfg = random_config("llama3", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=131072)
write_random_checkpoint("/root/r8b", cfg, tok, seed=0)
print("generated in", time.time() - t0, "s")
PY
  du -sh /root/r8b >> /root/acc/r8b.log
  /usr/bin/time -v python3 -m gsq.cli quantize /root/r8b --method gsq --max-blocks 2 --device cuda \
    --preset gpu --out /root/q8b > /root/acc/q8b.log 2>&1
  cp /root/q8b/report.json /root/acc/q8b-report.json 2>/dev/null
  echo done >> /root/acc/q8b.log
) &
wait
echo ALLDONE > /root/acc/ALLDONE
