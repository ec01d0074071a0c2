#!/usr/bin/env bash
# Device-side setup for GPU benchmarks (see benchmarks/RESULTS.md for the two-call recipe):
# installs carried wheels (.whl, .lcpwhl) into /tmp/site, keeps carried model halves and data outside the checkout.
set -e
mkdir -p /root/parts /root/data
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
for f in parts/smol.part.*; do [ -f "$f" ] && cp "$f" /root/parts/; done
[ -d .lcpwhl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .lcpwhl/*.whl
[ -d .devdata ] && cp -r .devdata/* /root/data/
if [ -f /root/parts/smol.part.aa ] && [ -f /root/parts/smol.part.ab ] && [ ! -f /root/smollm2.gguf ]; then
  cat /root/parts/smol.part.aa /root/parts/smol.part.ab > /root/smollm2.gguf
fi
ls -la /root/parts /root/data /root/smollm2.gguf 2>/dev/null || true
