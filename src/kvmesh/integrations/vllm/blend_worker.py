"""The worker's side of blending: materialize a claimed range before the forward pass; store passages after it.

``run`` (from ``start_load_kv``, after the exact prefix was loaded): reads the exact prefix's KV from the
request's pages, copies each stored passage out of L1, and runs ``compute.blend_kv`` with the engine's own
layers (``blend_model.VLLMLayers``), then writes the blended K/V of ``[fixed, end)`` into the request's pages
(with vLLM-CPU's own cache writer where it packs them, ``blend_model.write_with_engine_kernel``).
A passage that is gone or does not fit this engine is computed instead (one fewer reused).  A fault of the
cache (the daemon gone) reports the range's blocks as failed, so vLLM recomputes them exactly; anything else
is a bug and propagates.

``store_passages`` (from ``wait_for_save``, once a prompt is computed): each passage's K/V read from the
pages, keys rotated back to position 0, stored under its content key.
"""

from __future__ import annotations

import logging
import time

import torch

from kvmesh.blend.compute import Passage, blend_kv
from kvmesh.blend.rope import rerotate_keys
from kvmesh.client import CacheFault
from kvmesh.entry import EntryMeta, EntryMetaError
from kvmesh.integrations.vllm.blend_model import VLLMLayers, engine_model, write_with_engine_kernel
from kvmesh.integrations.vllm.blend_plan import BlendPlan, PassageSave
from kvmesh.integrations.vllm.engine_link import ABSORBED, DaemonLink
from kvmesh.keys import ChunkKey

log = logging.getLogger("kvmesh.vllm")


class PassageMismatch(CacheFault):
    """A stored passage whose description does not fit this engine's KV: corrupt, so computed instead."""


class PagesAsTokens:
    """A request's pages (one KV cache group's layers) read and written as token-major ``[layers, 2, T, H, D]``.

    The page orders are ``codecs.kvview``'s, imported when a blend runs: an engine that does not blend imports
    nothing of the codecs (``tests/test_engine_imports.py``).
    """

    def __init__(self, layers: list[torch.Tensor], page_view: str, block_size: int) -> None:
        self.layers = layers
        self.view = page_view
        self.block_size = block_size

    def read(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """K/V of tokens ``[start, end)`` of the request whose blocks are ``block_ids``."""
        from kvmesh.codecs.kvview import kv_parts

        first, last = start // self.block_size, -(-end // self.block_size)
        blocks = torch.tensor(block_ids[first:last], dtype=torch.long)
        pages = torch.stack([layer.index_select(0, blocks) for layer in self.layers])  # [L, nb, H, bs, 2D]
        keys, values = kv_parts(pages, self.view)  # [L, nb, H, bs, D]
        kv = torch.stack((keys, values), dim=1)  # [L, 2, nb, H, bs, D]
        kv = kv.permute(0, 1, 2, 4, 3, 5).reshape(len(self.layers), 2, -1, keys.shape[2], keys.shape[4])
        offset = first * self.block_size
        return kv[:, :, start - offset:end - offset].contiguous()

    def write(self, block_ids: list[int], start: int, kv: torch.Tensor) -> list[int]:
        """Write token-major ``kv`` for tokens ``start ..`` (``start`` at a block's start); the blocks written.

        Slots of the last block past the written tokens are zeroed: the engine writes its own tokens there.
        """
        from kvmesh.codecs.kvview import kv_targets

        if start % self.block_size:
            raise ValueError(f"a blend writes from a block's start, got token {start}")
        tokens = kv.shape[2]
        first, count = start // self.block_size, -(-tokens // self.block_size)
        blocks = block_ids[first:first + count]
        padded = torch.zeros(kv.shape[0], 2, count * self.block_size, *kv.shape[3:], dtype=kv.dtype)
        padded[:, :, :tokens] = kv
        logical = padded.view(kv.shape[0], 2, count, self.block_size, *kv.shape[3:]).permute(0, 1, 2, 4, 3, 5)
        pages = torch.empty(len(self.layers), count, *self.layers[0].shape[1:], dtype=self.layers[0].dtype)
        with kv_targets(pages, self.view) as (keys, values):
            keys.copy_(logical[:, 0])
            values.copy_(logical[:, 1])
        index = torch.tensor(blocks, dtype=torch.long)
        for layer, layer_pages in zip(self.layers, pages):
            layer.index_copy_(0, index, layer_pages)
        return blocks


class Blender:
    """Runs blends and stores passages for one worker (module docstring)."""

    def __init__(self, link: DaemonLink, pages: PagesAsTokens) -> None:
        self.link = link
        self.pages = pages
        self._model: VLLMLayers | None = None

    def model(self) -> VLLMLayers:
        if self._model is None:
            self._model = VLLMLayers(engine_model())
        return self._model

    def run(self, plan: BlendPlan, failed_blocks: set[int]) -> set[int]:
        """Blend ``plan``'s range into its pages; the blocks vLLM must recompute (empty when it worked).

        ``failed_blocks``: blocks whose load failed in this step; one in the exact prefix fails the range too.
        """
        size = self.pages.block_size
        range_blocks = set(plan.block_ids[plan.fixed // size:-(-plan.end // size)])
        if failed_blocks & set(plan.block_ids[:-(-plan.fixed // size)]):
            return range_blocks  # the exact prefix did not load: what would be blended over it is wrong too
        started = time.perf_counter()
        model = self.model()
        prefix = self.pages.read(plan.block_ids, 0, plan.fixed) if plan.fixed else None
        try:
            passages = self._passages(plan, model)
        except ABSORBED as err:
            self.link.fault("load", f"kvmesh could not read stored passages, vLLM recomputes: {err}", err)
            return range_blocks
        read = time.perf_counter()
        blended = blend_kv(model, plan.tokens, passages, plan.settings, prefix)
        computed = time.perf_counter()
        write_from = plan.fixed - plan.fixed % size
        blended_range = blended.kv[:, :, write_from:plan.end]
        if not write_with_engine_kernel(self.pages.layers, self.pages.view, size, plan.block_ids, write_from,
                                        blended_range):
            self.pages.write(plan.block_ids, write_from, blended_range)
        written = time.perf_counter()
        phases = blended.seconds
        client = self.link.client()
        if client is not None:
            try:
                client.report_blend(plan.end - plan.fixed, len(passages), len(blended.recomputed), written - started)
            except ABSORBED as err:
                self.link.fault("report", f"kvmesh could not count a blend: {err}", err)
        log.debug("kvmesh: blended request %s tokens %d-%d: %d passages reused, %d tokens recomputed; read %.3fs, "
                  "compute %.3fs, write %.3fs; compute: re-rotate %.3fs, layers 0-%d %.3fs, select %.3fs, the rest "
                  "%.3fs", plan.req_id, plan.fixed, plan.end, len(passages), len(blended.recomputed), read - started,
                  computed - read, written - computed, phases.get("place", 0.0), plan.settings.check_layer,
                  phases.get("full_layers", 0.0), phases.get("select", 0.0), phases.get("selected_layers", 0.0))
        return set()

    def _passages(self, plan: BlendPlan, model: VLLMLayers) -> list[Passage]:
        client = self.link.client()
        if client is None:
            return []
        found = []
        for segment in plan.passages:
            with client.acquire([ChunkKey(segment.digest, 0, segment.num_tokens)]) as slots:
                if not slots:
                    continue  # evicted since the lookup: computed instead
                try:
                    meta = EntryMeta.decode(slots[0].meta)
                    expected = (model.num_layers, 2, segment.num_tokens, model.num_kv_heads, model.head_dim)
                    if meta.view != "chunk" or meta.shape != expected or meta.torch_dtype != self.pages.layers[0].dtype:
                        raise PassageMismatch(f"a stored passage holds {meta.dtype} {meta.shape} ({meta.view}); this "
                                              f"engine's is {self.pages.layers[0].dtype} {expected}")
                except (EntryMetaError, PassageMismatch) as err:
                    self.link.fault("load", f"kvmesh: {err}; computing the passage instead",
                                    err if isinstance(err, CacheFault) else PassageMismatch(str(err)))
                    continue
                found.append(Passage(segment.start, segment.end, slots[0].tensor.clone()))
        return found

    def store_passages(self, save: PassageSave) -> None:
        """Store each passage's K/V from the request's pages, keys moved back to position 0."""
        client = self.link.client()
        if client is None or not save.passages:
            return
        inv_freq = self.model().inv_freq()
        stored = []
        for segment in save.passages:
            kv = self.pages.read(save.block_ids, segment.start, segment.end)
            kv[:, 0] = rerotate_keys(kv[:, 0], -segment.start, inv_freq)
            stored.append(kv)
        try:  # one reserve and one commit for them all (each key starts at 0: none continues another)
            client.put([ChunkKey(s.digest, 0, s.num_tokens) for s in save.passages], stored)
        except ABSORBED as err:
            self.link.fault("save", f"kvmesh passage store failed, dropped: {err}", err)
