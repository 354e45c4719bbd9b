#!/usr/bin/env bash
# The headline at concurrency: returning users of a multi-round chat whose histories left the engine's pool,
# vLLM's prefix cache vs LMCache vs kvmesh, side by side in each command (each system gets fresh engines).
#   1. ~4.3k-token prompts at 1, 2, 4 and 8 requests in flight (the curve over concurrency); at 8 also
#      kvmesh with its default tiers (L1 + disk, as `kvmesh serve` runs);
#   2. the curve over context length at saturation: ~2.1k (16 users, 8 in flight) and ~6.2k (6 users, 4 in
#      flight: the pool of 17,408 tokens holds two such requests); ~7.9k is in docs/benchmarks.md;
#   3. where decode bounds it: ~4.3k at 8 in flight with one answer token instead of 32.
# Needs LMCache's own environment: bash benchmarks/peers/setup_lmcache.sh
#   bash benchmarks/headline_concurrency.sh [results-dir]     # default results/concurrency
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0
OUT="${1:-results/concurrency}"
common=(--workload multi-round --rounds 3 --pool-tokens 17408 --qps 100 --warmup-rounds 1)
for n in 1 2 4 8; do
    systems=vllm,lmcache,kvmesh
    [ "$n" = 8 ] && systems=vllm,lmcache,kvmesh,kvmesh-disk
    .venv/bin/kvmesh bench run "${common[@]}" --users 8 --context 4000 --answer-tokens 32 --systems "$systems" \
        --concurrency "$n" --out "$OUT/ctx4000-c$n"
done
.venv/bin/kvmesh bench run "${common[@]}" --users 16 --context 1900 --answer-tokens 32 \
    --systems vllm,lmcache,kvmesh --concurrency 8 --out "$OUT/ctx1900-c8"
.venv/bin/kvmesh bench run "${common[@]}" --users 6 --context 5900 --answer-tokens 32 \
    --systems vllm,lmcache,kvmesh --concurrency 4 --out "$OUT/ctx5900-c4"
.venv/bin/kvmesh bench run "${common[@]}" --users 8 --context 4000 --answer-tokens 1 \
    --systems vllm,lmcache,kvmesh --concurrency 8 --out "$OUT/ctx4000-c8-answer1"
