"""Passages of a prompt: found by a message's first token or by spans, keyed by their tokens alone."""

from __future__ import annotations

import pytest

from kvmesh.blend.segments import (
    BadPassageSpans,
    check_spans,
    message_start_token,
    segment_digest,
    segments_in,
    split_at_boundaries,
)
from kvmesh.demo.model import default_model_dir, prepare_demo_model
from kvmesh.keys import model_namespace

NS = model_namespace("test-model", "L4.H2.D32.bfloat16")


def test_a_passage_has_one_key_wherever_it_stands_and_its_namespace_and_tokens_change_it() -> None:
    passage = [5, 6, 7, 8]
    first = segments_in([1, 2] + passage, [(2, 6)], NS, 0, 6, 1)[0]
    later = segments_in([9] * 10 + passage, [(10, 14)], NS, 0, 14, 1)[0]
    assert first.digest == later.digest == segment_digest(NS, passage)
    assert (first.start, later.start) == (2, 10)
    assert segment_digest(NS, [5, 6, 7]) != first.digest
    assert segment_digest(model_namespace("test-model", "L4.H2.D32.bfloat16", "tenant-b"), passage) != first.digest


def test_prompts_split_at_each_message_start_and_short_or_outside_passages_are_left_out() -> None:
    tokens = [0, 0, 1, 5, 5, 5, 1, 6, 6, 1, 7, 7, 7, 7]
    assert split_at_boundaries(tokens, 1, 0, len(tokens)) == [(2, 6), (6, 9), (9, 14)]
    assert split_at_boundaries(tokens, 1, 4, 12) == [(6, 9), (9, 12)]
    spans = split_at_boundaries(tokens, 1, 0, len(tokens))
    assert [(s.start, s.end) for s in segments_in(tokens, spans, NS, 0, 13, 4)] == [(2, 6)]  # (6, 9) too short
    assert [(s.start, s.end) for s in segments_in(tokens, spans, NS, 3, 14, 1)] == [(6, 9), (9, 14)]


def test_bad_passage_spans_are_refused_naming_them() -> None:
    assert check_spans([[0, 4], [4, 9]], 10) == [(0, 4), (4, 9)]
    with pytest.raises(BadPassageSpans, match=r"\[8, 12\) is not inside the prompt's 10 tokens"):
        check_spans([[8, 12]], 10)
    with pytest.raises(BadPassageSpans, match="overlaps"):
        check_spans([[0, 5], [3, 8]], 10)
    with pytest.raises(BadPassageSpans, match="list of"):
        check_spans("0-4", 10)
    with pytest.raises(BadPassageSpans, match=r"\[start, end\] in tokens, got \[1, 2, 3\]"):
        check_spans([[1, 2, 3]], 10)


def test_the_demo_models_messages_start_at_its_chat_templates_im_start() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(prepare_demo_model(default_model_dir())), local_files_only=True)
    token = message_start_token(tokenizer)
    assert tokenizer.convert_ids_to_tokens([token]) == ["<|im_start|>"]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
                                             tokenize=False)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    spans = split_at_boundaries(ids, token, 0, len(ids))
    assert [tokenizer.decode(ids[s:e]).strip().splitlines()[-1] for s, e in spans][-2:] == ["one<|im_end|>",
                                                                                            "two<|im_end|>"]
