"""The router's tokens of a prompt, from the demo model's own tokenizer files (vLLM's /tokenize is compared in
``tests/integrations/vllm/test_vllm_router.py``)."""

from __future__ import annotations

import pytest

from kvmesh.demo.model import default_model_dir, prepare_demo_model
from kvmesh.router.prompts import LocalTokenizer, NotTokenizable, PromptRequest


@pytest.fixture(scope="module")
def tokenizer() -> LocalTokenizer:
    return LocalTokenizer(str(prepare_demo_model(default_model_dir())))


def test_token_ids_are_taken_as_they_are_and_text_gets_the_models_special_tokens(tokenizer: LocalTokenizer) -> None:
    assert tokenizer.tokens(PromptRequest.of("completion", {"prompt": [5, 6, 7]})) == [5, 6, 7]
    assert tokenizer.tokens(PromptRequest.of("completion", {"prompt": [[5, 6, 7]]})) == [5, 6, 7]
    text = tokenizer.tokens(PromptRequest.of("completion", {"prompt": "Paris is"}))
    assert text == tokenizer.tokenizer.encode("Paris is", add_special_tokens=True)


def test_a_chat_is_rendered_with_the_template_and_text_parts_joined(tokenizer: LocalTokenizer) -> None:
    plain = PromptRequest.of("chat", {"messages": [{"role": "user", "content": "one\ntwo"}], "max_tokens": 3})
    parts = PromptRequest.of("chat", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]})
    assert "max_tokens" not in plain.fields  # only what decides the tokens
    tokens = tokenizer.tokens(plain)
    assert tokens == tokenizer.tokens(parts)
    rendered = tokenizer.tokenizer.decode(tokens)
    assert rendered.startswith("<|im_start|>") and rendered.endswith("<|im_start|>assistant\n")
    no_prompt = tokenizer.tokens(PromptRequest.of("chat", {"messages": plain.fields["messages"],
                                                           "add_generation_prompt": False}))
    assert no_prompt == tokens[:len(no_prompt)] and len(no_prompt) < len(tokens)


def test_what_the_router_cannot_tokenize_is_said(tokenizer: LocalTokenizer) -> None:
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
    with pytest.raises(NotTokenizable, match="other than text"):
        tokenizer.tokens(PromptRequest.of("chat", {"messages": [image]}))
    with pytest.raises(NotTokenizable, match="batch"):
        tokenizer.tokens(PromptRequest.of("completion", {"prompt": ["a", "b"]}))
