#!/usr/bin/env bash
# Throughput at a TTFT objective, ~4k tokens of context per user: Poisson arrivals at rising rates, up to 8
# requests in flight, each system swept over the rates it can approach (vLLM's prefix cache saturates near
# 0.2 req/s here, so sweeping it higher only measures its queue). Each rate gets its own documents.
#   bash benchmarks/headline_qps.sh        # results/qps-4000-vllm/, results/qps-4000-kvmesh/
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0
common=(--workload multi-round --users 12 --rounds 4 --context 4000 --answer-tokens 32 --pool-tokens 4224
        --concurrency 8 --ttft-objective 2)
.venv/bin/kvmesh bench run "${common[@]}" --systems vllm --qps 0.15 --qps 0.3 --out results/qps-4000-vllm
.venv/bin/kvmesh bench run "${common[@]}" --systems kvmesh --qps 0.3 --qps 0.6 --qps 1.2 --qps 2.4 \
    --out results/qps-4000-kvmesh
