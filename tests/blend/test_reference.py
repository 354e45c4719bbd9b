"""The transformers reference of blending, on the demo model in fp32 (short passages of real text)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvmesh.bench.texts import document_token_ids
from kvmesh.blend.quality import continuation_logprobs
from kvmesh.blend.reference import Passage, blend, passage_kv
from kvmesh.blend.rope import UnsupportedRope, model_inv_freq, rerotate_keys
from kvmesh.demo.model import default_model_dir, prepare_demo_model

PASSAGE = 48


@pytest.fixture(scope="module")
def model_and_texts():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_demo_model(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
    return model, [doc[:PASSAGE] for doc in document_token_ids(tokenizer, 4, PASSAGE, seed=5)]


def test_a_delta_rotation_moves_keys_to_where_they_would_have_been_computed(model_and_texts) -> None:
    """Layer-0 keys depend only on the token and its position: computed at 0 and moved to 100, they equal those
    computed at 100; values do not move."""
    model, texts = model_and_texts
    inv_freq = model_inv_freq(model)
    at_zero, at_hundred = passage_kv(model, texts[0], 0), passage_kv(model, texts[0], 100)
    moved = rerotate_keys(at_zero[0, 0], 100, inv_freq)
    assert torch.allclose(moved, at_hundred[0, 0], atol=1e-4), float((moved - at_hundred[0, 0]).abs().max())
    assert torch.equal(at_zero[0, 1], at_hundred[0, 1])
    assert torch.allclose(rerotate_keys(moved, -100, inv_freq), at_zero[0, 0], atol=1e-4)
    assert not torch.allclose(at_zero[0, 0], at_hundred[0, 0], atol=1e-2)  # the rotation is not a no-op


def test_recomputing_every_token_equals_a_full_prefill(model_and_texts) -> None:
    model, (a, b, c, tail) = model_and_texts
    tokens = a + b + c
    passages = [Passage(0, PASSAGE, passage_kv(model, a)), Passage(PASSAGE, 2 * PASSAGE, passage_kv(model, b, 7), 7)]
    full = passage_kv(model, tokens)
    blended = blend(model, tokens, passages, "cacheblend", 1.0)
    assert len(blended.recomputed) == len(tokens) and blended.reused == 2 * PASSAGE
    assert torch.allclose(blended.kv, full, atol=1e-4), float((blended.kv - full).abs().max())
    assert torch.allclose(continuation_logprobs(model, blended.kv, tail[:8]),
                          continuation_logprobs(model, full, tail[:8]), atol=1e-4)


def test_a_passage_where_it_was_stored_is_reused_bit_for_bit_as_a_prefix(model_and_texts) -> None:
    model, (a, _, c, _) = model_and_texts
    stored = passage_kv(model, a)
    blended = blend(model, a + c, [Passage(0, PASSAGE, stored)], "none")
    assert torch.equal(blended.kv[:, :, :PASSAGE], stored)  # exactly the stored prefix: no rotation, no recompute
    assert blended.recomputed.tolist() == list(range(PASSAGE, 2 * PASSAGE))  # only the tokens no passage covers
    full = passage_kv(model, a + c)
    assert torch.allclose(blended.kv[:, :, PASSAGE:], full[:, :, PASSAGE:], atol=1e-4)


def test_moved_passages_without_recompute_diverge_and_recompute_brings_them_back(model_and_texts) -> None:
    model, (a, b, c, tail) = model_and_texts
    tokens = c + a + b  # both passages away from where they were computed, after another context
    passages = [Passage(PASSAGE, 2 * PASSAGE, passage_kv(model, a)),
                Passage(2 * PASSAGE, 3 * PASSAGE, passage_kv(model, b))]
    full = passage_kv(model, tokens)
    errors = {fraction: float((blend(model, tokens, passages, "cacheblend", fraction).kv - full).abs().mean())
              for fraction in (0.0, 0.5, 1.0)}
    assert errors[0.0] > errors[0.5] > errors[1.0]
    assert errors[1.0] < 1e-4


@pytest.mark.parametrize("rule", ["cacheblend", "passage-start", "random", "kvmesh"])
def test_each_rule_recomputes_its_budget_of_reused_tokens(model_and_texts, rule: str) -> None:
    model, (a, b, c, _) = model_and_texts
    tokens = c[:10] + a + b
    passages = [Passage(10, 10 + PASSAGE, passage_kv(model, a)), Passage(10 + PASSAGE, 10 + 2 * PASSAGE,
                                                                           passage_kv(model, b))]
    blended = blend(model, tokens, passages, rule, 0.25, first_tokens=4)
    chosen = set(blended.recomputed.tolist())
    assert set(range(10)) <= chosen and len(chosen) == 10 + round(0.25 * 2 * PASSAGE)
    if rule == "passage-start":  # each passage's first tokens, 12 each
        assert chosen == set(range(10)) | set(range(10, 22)) | set(range(58, 70))
    if rule == "kvmesh":  # each passage's first 4 tokens, then the largest deviations
        assert set(range(10, 14)) | set(range(58, 62)) <= chosen


def test_bad_blends_are_refused_naming_the_value(model_and_texts) -> None:
    model, (a, b, _, _) = model_and_texts
    stored = passage_kv(model, a)
    with pytest.raises(ValueError, match="unknown selection rule 'best'"):
        blend(model, a + b, [Passage(0, PASSAGE, stored)], "best")
    with pytest.raises(ValueError, match="between 0 and 1, got 1.5"):
        blend(model, a + b, [Passage(0, PASSAGE, stored)], "cacheblend", 1.5)
    with pytest.raises(ValueError, match="overlap"):
        blend(model, a + b, [Passage(0, PASSAGE, stored), Passage(10, 10 + PASSAGE, stored)])
    with pytest.raises(ValueError, match="holds KV of 48 tokens"):
        Passage(0, 10, stored)


def test_rotary_embeddings_that_are_not_pure_rotations_are_refused() -> None:
    def fake(rope_type: str, scaling: float = 1.0):
        rotary = SimpleNamespace(rope_type=rope_type, attention_scaling=scaling, inv_freq=torch.ones(4))
        return SimpleNamespace(model=SimpleNamespace(rotary_emb=rotary))

    with pytest.raises(UnsupportedRope, match="'yarn'"):
        model_inv_freq(fake("yarn"))
    with pytest.raises(UnsupportedRope, match="scales cos/sin by 1.2"):
        model_inv_freq(fake("default", 1.2))
    assert model_inv_freq(fake("llama3")).numel() == 4


def test_an_exact_prefix_is_kept_and_the_rest_blended_after_it(model_and_texts) -> None:
    """The vLLM path's shape: tokens [0, fixed) are a prefix hit, given and never recomputed."""
    from kvmesh.blend.compute import BlendSettings, blend_kv
    from kvmesh.blend.reference import TransformersLayers

    model, (a, b, c, _) = model_and_texts
    tokens = a + c + b
    full = passage_kv(model, tokens)
    prefix = full[:, :, :PASSAGE].clone()
    passages = [Passage(2 * PASSAGE, 3 * PASSAGE, passage_kv(model, b))]
    everything = blend_kv(TransformersLayers(model), tokens, passages, BlendSettings("cacheblend", 1.0), prefix)
    assert torch.equal(everything.kv[:, :, :PASSAGE], prefix)
    assert everything.recomputed.tolist() == list(range(PASSAGE, 3 * PASSAGE))  # never a prefix token
    assert torch.allclose(everything.kv, full, atol=1e-4), float((everything.kv - full).abs().max())
    reused = blend_kv(TransformersLayers(model), tokens, passages, BlendSettings("none"), prefix)
    assert reused.recomputed.tolist() == list(range(PASSAGE, 2 * PASSAGE))
    with pytest.raises(ValueError, match="exact prefix"):
        blend_kv(TransformersLayers(model), tokens, [Passage(0, PASSAGE, prefix)], BlendSettings(), prefix)


def test_the_question_rule_reads_the_question_and_returns_only_the_blended_tokens(model_and_texts) -> None:
    """The question after the passages scores them and is then left to the engine: no KV of it is returned, a 100%
    blend still equals the prefill of the blended tokens, and without a question the rule is kvmesh's."""
    model, (a, b, c, tail) = model_and_texts
    tokens = c[:10] + a + b
    passages = [Passage(10, 10 + PASSAGE, passage_kv(model, a)),
                Passage(10 + PASSAGE, 10 + 2 * PASSAGE, passage_kv(model, b))]
    question = tail[:12]
    asked = blend(model, tokens, passages, "question", 0.25, first_tokens=4, lookahead=question)
    assert asked.kv.shape[2] == len(tokens) and int(asked.recomputed.max()) < len(tokens)
    chosen = set(asked.recomputed.tolist())
    assert set(range(14)) | set(range(58, 62)) <= chosen and len(chosen) == 10 + round(0.25 * 2 * PASSAGE)
    unasked = blend(model, tokens, passages, "question", 0.25, first_tokens=4)
    assert unasked.recomputed.tolist() == blend(model, tokens, passages, "kvmesh", 0.25, first_tokens=4
                                                ).recomputed.tolist()
    assert set(unasked.recomputed.tolist()) != chosen  # the question moved the choice
    everything = blend(model, tokens, passages, "question", 1.0, lookahead=question)
    full = passage_kv(model, tokens)
    assert torch.allclose(everything.kv, full, atol=1e-4), float((everything.kv - full).abs().max())
