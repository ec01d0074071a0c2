#!/usr/bin/env bash
# Device job (H200): accuracy-table pieces (benchmarks/accuracy_table.py, gpu preset) in parallel
# streams, and optionally a Llama-3.1-8B-shaped random checkpoint generated on the device and
# quantized with `gsq quantize --method gsq --max-blocks 2 --device cuda` (streamed).
#
#   bash benchmarks/device_accuracy_streams.sh "gsq 2 0" "gsq 2 1" "gptq 3 1;8b"
#
# Each argument is one stream: pieces "method bits seed" separated by ';', run one after the
# other; the piece "8b" is the 8B job (Q8B_FLAGS: extra quantize flags). Results under /root/acc.
# Run detached from the repo root after the model is joined at /root/smollm2.gguf (RESULTS §12).
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p /root/acc

run_8b() {
  python3 - > /root/acc/r8b.log 2>&1 <<'PY'
import time
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
  # shellcheck disable=SC2086
  /usr/bin/time -v python3 -m gsq.cli quantize /root/r8b --method gsq --max-blocks 2 --device cuda \
    --preset gpu $Q8B_FLAGS --out /root/q8b > /root/acc/q8b.log 2>&1
  cp /root/q8b/report.json /root/acc/q8b-report.json 2>/dev/null
  echo done >> /root/acc/q8b.log
}

stream() {  # name, then "method bits seed;method bits seed;..." (or "8b")
  local name=$1 piece m b s
  IFS=';' read -ra pieces <<<"$2"
  for piece in "${pieces[@]}"; do
    echo "=== $(date +%T) start $piece" >> /root/acc/$name.log
    if [ "$piece" = 8b ]; then
      run_8b
    else
      read -r m b s <<<"$piece"
      python3 benchmarks/accuracy_table.py --preset gpu --device cuda --methods $m --bits $b \
        --seeds $s --model /root/smollm2.gguf --data /root/data --json /root/acc/$name.json \
        >> /root/acc/$name.log 2>&1
    fi
    echo "=== $(date +%T) end $piece rc=$?" >> /root/acc/$name.log
  done
}

i=0
for spec in "$@"; do
  stream "s$i" "$spec" &
  i=$((i + 1))
done
wait
echo ALLDONE > /root/acc/ALLDONE
