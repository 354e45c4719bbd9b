#!/usr/bin/env bash
# The multi-round QA headline: the same workload at ~1k, 2k and 4k tokens of context per user, systems one
# after the other on one machine. Results land in results/headline-<context>/ (report.html, report.md, results.json).
#   CONTEXTS="1000 2000 4000" SYSTEMS=vllm,lmcache,kvmesh,kvmesh-disk,vllm-big bash benchmarks/headline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0
CONTEXTS="${CONTEXTS:-1000 2000 4000}"
SYSTEMS="${SYSTEMS:-vllm,lmcache,kvmesh,kvmesh-disk,vllm-big}"
if [[ "$SYSTEMS" == *lmcache* ]]; then bash benchmarks/peers/setup_lmcache.sh >/dev/null; fi
for context in $CONTEXTS; do
    .venv/bin/kvmesh bench run --workload multi-round --users 20 --rounds 4 --context "$context" \
        --answer-tokens 32 --pool-tokens 4224 --systems "$SYSTEMS" --out "results/headline-$context"
done
