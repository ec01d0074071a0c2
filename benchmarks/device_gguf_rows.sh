#!/usr/bin/env bash
# GGUF-table rows (benchmarks/gguf_table.py) made side by side on one GPU machine of 16 cores,
# after benchmarks/device_setup.sh has put the model and data under /root:
#   setsid nohup bash benchmarks/device_gguf_rows.sh STREAM... > /root/run.log 2>&1 &
# Each STREAM is a comma-separated list of rows for one `--stage make` process (GSQ at the cpu
# preset is bound by Python, not by the GPU, so several share it; one torch thread each). refine
# rows wait for llama.cpp's own files (their inputs), made first. ONE
# `--stage llamacpp` process evaluates the files as they come: two llama.cpp processes on these
# 16 cores slowed each other down more than 4x. Then --stage all assembles /root/run/table.json.
# Optional environment: LC_FILES, a glob of the queued files llama.cpp evaluates (default all);
# LLAMACPP_FROM, an earlier results JSON whose llama.cpp ppl is reused for byte-identical files.
set -u
LC_FILES=${LC_FILES:-*} LLAMACPP_FROM=${LLAMACPP_FROM:-}
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY=PASSIVE
M=/root/smollm2.gguf C=/root/data/calib T=/root/data/wikitext2-test.raw W=/root/gw R=/root/run
mkdir -p "$W" "$R"
tab() {  # gguf_table.py with the fused sampler and bf16 autocast at the cpu preset
  GSQ_FUSED=1 python3 benchmarks/gguf_table.py --model $M --calib $C --text $T --device cuda \
    --preset cpu --budget "--autocast bf16" --work $W "$@"
}
stream() {  # ROW[,ROW...], one after another; refine rows first wait for llama.cpp's files
  local row
  for row in ${1//,/ }; do
    if [[ $row == refine-* ]]; then while [ ! -f $W/lc.done ]; do sleep 2; done; fi
    tab --threads 1 --stage make --json $R/$row.json --rows $row > $R/$row.log 2>&1
  done
}
(tab --threads 4 --stage make --json $R/lc.json --rows 'lc-*' > $R/lc.log 2>&1; touch $W/lc.done) &
pids=()
for s in "$@"; do stream "$s" & pids+=($!); done
tab --threads 12 --stage llamacpp --lc-files "$LC_FILES" --json $R/l.json > $R/l.log 2>&1 & L=$!
wait "${pids[@]}"
touch $W/llamacpp-queue.closed
wait $L
rows=$(printf '%s\n' "$@" | tr ',' ' ')
tab --threads 16 ${LLAMACPP_FROM:+--llamacpp-from "$LLAMACPP_FROM"} --json $R/table.json \
  --rows $rows > $R/table.log 2>&1
echo ALL DONE
