"""``kvmesh explain --engine URL --prompt-file FILE``: which chunks of a prompt the node holds, and why not more.

The prompt is tokenized by the engine itself (vLLM's ``/tokenize``, with its chat template for messages), so
the tokens are the ones a request would carry.  Its chunk keys are computed in the namespace the engine's
scheduler registered with the daemon (model fingerprint, page format, tenant salt), and a probe per part (the
router's: it moves nothing and is not counted) finds how much is stored; the reason the hit ends there is the
one a request that asked would get (``integrations.vllm.explain.hit_end_reason``).  Each stored chunk is then
described (``describe_entries``: tier, bytes, age, codec).  A request's own cache salt or LoRA would put it in
another namespace: this names the engine's default one.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Any

from kvmesh.keys import ChunkKey, PartKeys

TIER_ORDER = ("l1", "disk", "redis")  # nearest first


class ExplainError(ValueError):
    """The engine or the daemon cannot answer for this prompt (named in the message)."""


@dataclass(frozen=True)
class ChunkPlace:
    """One chunk of the prompt and where it is stored (tier ``missing``: nowhere)."""

    key: ChunkKey
    tier: str  # "L1", "disk", "redis", "missing"
    nbytes: int = 0
    age: float = -1.0  # seconds (tiers.base.EntryInfo says what it means per tier); -1: not known
    codec: str = ""


@dataclass(frozen=True)
class PromptReport:
    model: str
    tokens: int
    chunks: list[ChunkPlace]  # every chunk of the prompt, then a stored partial chunk that continues the hit
    hit_tokens: int
    reason: str


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def tokenize(engine_url: str, prompt: str | None = None, messages: list[dict[str, Any]] | None = None
             ) -> tuple[str, list[int]]:
    """The engine's model and the prompt's tokens as the engine makes them (a chat with its own template)."""
    base = engine_url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as reply:
            model = json.loads(reply.read())["data"][0]["id"]
        body: dict[str, Any] = {"model": model}
        body.update({"prompt": prompt} if messages is None else {"messages": messages, "add_generation_prompt": True})
        return model, list(_post(f"{base}/tokenize", body)["tokens"])
    except OSError as err:
        raise ExplainError(f"the engine at {engine_url} did not answer: {err}") from None


def engine_record(engines: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """The scheduler of ``model`` among the engines connected to the daemon."""
    for engine in engines:
        if engine.get("role") == "scheduler" and engine.get("model") == model and engine.get("namespace"):
            return engine
    served = ", ".join(sorted({str(e.get("model")) for e in engines if e.get("role") == "scheduler"})) or "none"
    raise ExplainError(f"no engine serving {model!r} is connected to this kvmesh daemon (it serves: {served}); "
                       "pass --set instance=... / socket_dir=... to reach the engine's daemon")


def explain_prompt(client: Any, engine: dict[str, Any], model: str, tokens: list[int]) -> PromptReport:
    """Where each chunk of ``tokens`` is stored under the engine's default namespace, and why the hit ends.

    An engine that stores a chunk in several parts (tensor-parallel ranks, KV cache groups) holds it where
    every part does: a chunk's tier is its furthest part's (missing if any is), its bytes all parts' together.
    The lookup is a probe: it moves nothing between tiers and is not counted.
    """
    from kvmesh.integrations.vllm.explain import hit_end_reason
    from kvmesh.integrations.vllm.planner import end_at_state, held_by_every_part, lookup_parts
    from kvmesh.router.nodes import EngineKeys

    named = EngineKeys.from_record(engine)
    parts = PartKeys.every_part(named.tp_world, named.groups)
    keys = named.keys(tokens, named.namespace)
    per_part, found = lookup_parts(client, tokens, keys, named.namespace, parts, count=False, prefetch=False)
    hit_keys = held_by_every_part(per_part)
    cut = "state" if named.state_block and end_at_state(hit_keys, len(tokens), named.state_block) else None
    _, reason = hit_end_reason(len(tokens), keys, hit_keys, per_part, found[0], cut, named.chunk_size)
    known = {key.digest for key in keys}
    shown = [*keys, *(key for key in hit_keys if key.digest not in known)]  # a stored partial chunk ends the hit
    stored = {key.digest for key in hit_keys}
    described = client.describe_entries([part(key.digest) for key in shown for part in parts])
    places = []
    for index, key in enumerate(shown):
        infos = described[index * len(parts):(index + 1) * len(parts)]
        if key.digest not in stored or any(info is None for info in infos):  # after the hit, or gone since
            places.append(ChunkPlace(key, "missing"))
            continue
        tiers = [info.tier for info in infos]
        furthest = next((tier for tier in TIER_ORDER[::-1] if tier in tiers), tiers[0])
        places.append(ChunkPlace(key, "L1" if furthest == "l1" else furthest, sum(info.nbytes for info in infos),
                                 max(info.age for info in infos), "/".join(sorted({info.codec for info in infos}))))
    return PromptReport(model, len(tokens), places, hit_keys[-1].end if hit_keys else 0, reason)
