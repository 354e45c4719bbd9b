"""The scheduler's side of blending: which stored passages a request reuses, and what it claims from vLLM.

vLLM asks a connector for one number: how many tokens after the engine's own hit it will supply.  A blend
claims ``[fixed, end)``, from the end of the exact prefix (``fixed``: the engine's hit or kvmesh's exact
chunks) to the end of the last stored passage before the prompt's last token, and promises to materialize
every token of it before the forward pass (``blend_worker.py``): stored passages re-rotated, everything else
and a selected share recomputed with the engine's own layers.  vLLM then computes the rest of the prompt
exactly, over the blended KV.  A blend is claimed only where stored passages cover at least half of that range;
otherwise the request is served from exact prefixes alone.

Exact stays exact: blended KV is approximate, so a blended request stores no exact chunk from ``fixed`` on
(its keys are cut there), and the engine runs without vLLM's own prefix cache (``blend_model.why_not_blend``).
Every passage a request holds (``blend_min_passage_tokens`` or longer) is stored once its prompt is computed,
under its content key (``segments.segment_digest``), position-free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from kvmesh.blend.compute import BlendSettings
from kvmesh.blend.segments import BadPassageSpans, Segment, check_spans, segments_in, split_at_boundaries
from kvmesh.config import KVMeshConfig
from kvmesh.integrations.vllm.engine_link import ABSORBED, DaemonLink
from kvmesh.integrations.vllm.explain import kvmesh_params
from kvmesh.keys import ChunkKey, Namespace

log = logging.getLogger("kvmesh.vllm")

MIN_COVERED = 0.5  # the share of the claimed range stored passages must cover for a blend to be worth it


@dataclass
class BlendPlan:
    """What the worker materializes before the forward pass: tokens ``[fixed, end)`` of a request, blended."""

    req_id: str
    tokens: list[int]  # the prompt's tokens ``[0, end)``
    fixed: int  # the exact prefix's end: its KV is in the request's pages when the blend runs
    end: int
    block_ids: list[int]  # the request's blocks, covering ``[0, end)``
    passages: list[Segment]  # stored passages inside ``[fixed, end)`` to reuse
    settings: BlendSettings


@dataclass
class PassageSave:
    """Passages of a request whose prompt this step finished computing: stored from its pages."""

    req_id: str
    block_ids: list[int]
    passages: list[Segment]


@dataclass
class RequestBlend:
    """The scheduler's memory of one request's blend."""

    segments: list[Segment]  # every passage of the prompt long enough to store
    fixed: int = 0
    end: int = 0  # 0: no blend claimed
    reused: list[Segment] = field(default_factory=list)
    saved: bool = False


class BlendScheduler:
    """Finds stored passages and plans blends (module docstring); one per scheduler."""

    def __init__(self, config: KVMeshConfig, link: DaemonLink, unavailable: str | None,
                 boundary: Callable[[], int | None]) -> None:
        self.config = config
        self.link = link
        self.unavailable = unavailable  # why this engine cannot blend (None: it can)
        self._boundary = boundary
        self.requests: dict[str, RequestBlend] = {}
        self.pending: list[BlendPlan] = []
        self._logged: set[str] = set()

    def settings(self) -> BlendSettings:
        return BlendSettings(fraction=self.config.blend_fraction)

    def _once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            log.info("%s", message)

    @cached_property
    def boundary_token(self) -> int | None:
        """The token each passage starts with: the configured one, else the chat template's (found once)."""
        configured = self.config.blend_boundary_token
        return configured if configured >= 0 else self._boundary()

    def track(self, request: Any, tokens: list[int], namespace: Namespace) -> RequestBlend | None:
        """The request's passages, if it blends (asked for, or ``blend`` on), where this engine can."""
        known = self.requests.get(request.request_id)
        if known is not None:
            return known
        params = kvmesh_params(request)
        if not (self.config.blend or params.get("blend")):
            return None
        if self.unavailable is not None:
            self._once(f"kvmesh: blend asked for, but this engine serves exact prefixes only: {self.unavailable}")
            return None
        if "passages" in params:
            try:
                spans = check_spans(params["passages"], len(tokens))
            except BadPassageSpans as err:
                log.warning("kvmesh: request %s: %s; served without blending", request.request_id, err)
                return None
        else:
            boundary = self.boundary_token
            if boundary is None:
                self._once("kvmesh: blend asked for without passage spans, and the model's chat template names no "
                           "message-start token (set blend_boundary_token); served without blending")
                return None
            spans = split_at_boundaries(tokens, boundary, 0, len(tokens))
        segments = segments_in(tokens, spans, namespace, 0, len(tokens), self.config.blend_min_passage_tokens)
        blend = self.requests[request.request_id] = RequestBlend(segments)
        return blend

    def claim(self, blend: RequestBlend, tokens: list[int], fixed: int) -> int:
        """The end of the blended range after ``fixed`` (0: no blend), from the passages stored in L1 now."""
        blend.fixed, blend.end, blend.reused = fixed, 0, []
        candidates = [s for s in blend.segments if s.start >= fixed and s.end <= len(tokens) - 1]
        client = self.link.client() if candidates else None
        if client is None:
            return 0
        reused = []
        try:
            for segment in candidates:  # a passage below L1 starts its promotion and is computed this time
                found = client.lookup_with_partials([ChunkKey(segment.digest, 0, segment.num_tokens)], partials=False)
                if found.hits and found.resident(0):
                    reused.append(segment)
        except ABSORBED as err:
            self.link.fault("lookup", f"kvmesh passage lookup failed, not blending: {err}", err)
            return 0
        if not reused:
            return 0
        end = reused[-1].end
        if sum(s.num_tokens for s in reused) < MIN_COVERED * (end - fixed):
            return 0
        blend.end, blend.reused = end, reused
        return end

    def plan(self, req_id: str, tokens: list[int], block_ids: list[int]) -> None:
        blend = self.requests.get(req_id)
        if blend is not None and blend.end:
            self.pending.append(BlendPlan(req_id, tokens[:blend.end], blend.fixed, blend.end, list(block_ids),
                                          blend.reused, self.settings()))

    def saves(self, req_id: str, tokens: int, step_end: int, block_ids: list[int]) -> PassageSave | None:
        """The request's passages to store once its whole prompt is computed (once; reused ones are stored)."""
        blend = self.requests.get(req_id)
        if blend is None or blend.saved or step_end < tokens:
            return None
        blend.saved = True
        reused = {s.digest for s in blend.reused}
        fresh = [s for s in blend.segments if s.digest not in reused]
        return PassageSave(req_id, list(block_ids), fresh) if fresh else None

    def take_plans(self) -> list[BlendPlan]:
        plans, self.pending = self.pending, []
        return plans

    def finished(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
