#!/usr/bin/env bash
# The GGUF table's gsq rows (gguf_table.py) and the act-order reference rows (quality.py), side by
# side on one GPU machine of 16 cores, after benchmarks/device_setup.sh has put the model and data
# under /root. Four `--stage make` processes share the GPU (GSQ at the cpu preset is bound by
# Python, not by the GPU), one `--stage llamacpp` process evaluates their files as they come and a
# second one joins when the GPU work is done. Results and logs in /root/run; usage:
#   setsid nohup bash benchmarks/device_gguf_rows.sh > /root/run.log 2>&1 &
set -u
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
M=/root/smollm2.gguf C=/root/data/calib T=/root/data/wikitext2-test.raw W=/root/gw R=/root/run
mkdir -p "$W" "$R"
tab() {  # gguf_table.py with the fused sampler and bf16 autocast at the cpu preset
  GSQ_FUSED=1 python3 benchmarks/gguf_table.py --model $M --calib $C --text $T --device cuda \
    --preset cpu --budget "--autocast bf16" --work $W "$@"
}
make_rows() {  # NAME ROW...: one --stage make process, 2 threads
  local name=$1; shift
  tab --threads 2 --stage make --json $R/$name.json --rows "$@" > $R/$name.log 2>&1
}
stream() {  # NAME FRESH_ROW REFINE_ROW [MORE_ROWS]: refine rows wait for llama.cpp's files
  local name=$1 fresh=$2; shift 2
  make_rows $name-a "$fresh"
  while [ ! -f $W/lc.done ]; do sleep 2; done
  make_rows $name-b "$@"
}
(tab --threads 4 --stage make --json $R/lc.json --rows 'lc-*' > $R/lc.log 2>&1; touch $W/lc.done) &
stream s1 gsq-Q2_0 refine-Q2_K gsq-Q2_0+embd & S1=$!
stream s2 gsq-Q2_K+embd refine-Q4_0 gsq-Q4_0+embd & S2=$!
stream s3 gsq-Q3_K+embd refine-Q3_K_M & S3=$!
stream s4 gsq-Q4_K+embd refine-Q4_K_M & S4=$!
OMP_NUM_THREADS=2 python3 benchmarks/quality.py --model $M --calib $C --text $T --device cuda --no-base \
  --rows reference --bits 3 2 --methods gptq gsq --set act_order=true \
  --json $R/ref-actorder.json > $R/ref-actorder.log 2>&1 &
tab --threads 8 --stage llamacpp --json $R/l1.json > $R/l1.log 2>&1 & L1=$!
wait $S1 $S2 $S3 $S4
touch $W/llamacpp-queue.closed
tab --threads 6 --stage llamacpp --json $R/l2.json > $R/l2.log 2>&1 &
wait
echo ALL DONE
