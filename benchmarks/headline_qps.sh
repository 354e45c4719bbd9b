#!/usr/bin/env bash
# Throughput at a TTFT objective, ~4k tokens of context per user, steady state: at each rate every user's
# first round goes one at a time (--warmup-rounds 1), then the returning rounds arrive as a Poisson process,
# up to 8 in flight. Each system is swept over the rates it can approach (vLLM's prefix cache saturates near
# 0.25 req/s here, so sweeping it higher only measures its queue). Each rate gets its own documents.
#   bash benchmarks/headline_qps.sh        # results/qps-4000-vllm/, results/qps-4000-kvmesh/
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0
common=(--workload multi-round --users 12 --rounds 4 --context 4000 --answer-tokens 32 --pool-tokens 4224
        --concurrency 8 --ttft-objective 2 --warmup-rounds 1)
.venv/bin/kvmesh bench run "${common[@]}" --systems vllm --qps 0.15 --qps 0.3 --out results/qps-4000-vllm
.venv/bin/kvmesh bench run "${common[@]}" --systems kvmesh --qps 0.5 --qps 1 --qps 2 --qps 4 \
    --out results/qps-4000-kvmesh
