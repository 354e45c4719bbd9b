"""A request's prompt tokens, exactly as the engine will make them.

Keys are hashes of token ids, so a router that tokenizes differently from the engine (no chat template, a
template rendered without the tools, other special tokens) routes every request as a miss, silently.  The
router tokenizes with the engine's own tokenizer files and chat template, the way vLLM's OpenAI server does
(render the template to text, then encode it without special tokens; completions encode with them), and
checks itself against the engine's ``/tokenize``: at start, and on a sample of requests.  A model whose check
fails is tokenized by its engine from then on (one more HTTP call per request; routing stays right).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("kvmesh.router")

# the request fields that change a prompt's tokens, as vLLM's /tokenize accepts them
CHAT_FIELDS = ("messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
               "chat_template", "chat_template_kwargs", "tools")
PROMPT_FIELDS = ("prompt", "add_special_tokens")

CHECK_CHAT = [{"role": "system", "content": "You are checked by kvmesh's router."},
              {"role": "user", "content": "Which engine holds this conversation?"},
              {"role": "assistant", "content": "The one whose node stored it."},
              {"role": "user", "content": "And the next turn?"}]
CHECK_PROMPT = "The router tokenizes this sentence exactly as the engine does."


class NotTokenizable(ValueError):
    """A prompt the router does not tokenize itself (images, a batch of several prompts, ...)."""


@dataclass(frozen=True, slots=True)
class PromptRequest:
    """The part of a request body that decides its tokens."""

    kind: str  # "chat" or "completion"
    fields: dict[str, Any]

    @classmethod
    def of(cls, kind: str, body: dict[str, Any]) -> PromptRequest:
        names = CHAT_FIELDS if kind == "chat" else PROMPT_FIELDS
        return cls(kind, {name: body[name] for name in names if name in body})

    def tokenize_body(self, model: str) -> dict[str, Any]:
        """The body of the engine's ``/tokenize`` for this prompt."""
        return {"model": model, **self.fields}


def _text_content(content: Any) -> str:
    """A message's content as text; vLLM joins a list of text parts with newlines for string templates."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text" for part in content):
        return "\n".join(str(part.get("text", "")) for part in content)
    raise NotTokenizable("a message with content other than text")


class LocalTokenizer:
    """The engine's tokenizer and chat template, loaded from the model's files."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)

    def tokens(self, prompt: PromptRequest) -> list[int]:
        fields = prompt.fields
        if prompt.kind == "completion":
            text = fields.get("prompt")
            if isinstance(text, list) and len(text) == 1:
                text = text[0]
            if isinstance(text, list) and all(isinstance(t, int) for t in text):
                return list(text)
            if not isinstance(text, str):
                raise NotTokenizable("a batch of prompts, or a prompt that is neither text nor token ids")
            return list(self.tokenizer.encode(text, add_special_tokens=fields.get("add_special_tokens", True)))
        messages = [{**message, "content": _text_content(message.get("content"))}
                    for message in fields.get("messages") or []]
        kwargs = dict(fields.get("chat_template_kwargs") or {})
        rendered = self.tokenizer.apply_chat_template(
            messages, tools=fields.get("tools"), chat_template=fields.get("chat_template"), tokenize=False,
            add_generation_prompt=fields.get("add_generation_prompt", True),
            continue_final_message=fields.get("continue_final_message", False), **kwargs)
        return list(self.tokenizer.encode(rendered, add_special_tokens=fields.get("add_special_tokens", False)))


def check_samples() -> list[PromptRequest]:
    """The prompts the router checks at start: a chat with a system prompt, and plain text."""
    return [PromptRequest("chat", {"messages": CHECK_CHAT}), PromptRequest("completion", {"prompt": CHECK_PROMPT})]
