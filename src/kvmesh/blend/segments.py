"""Passages of a prompt: where they start and end, and the key their KV is stored under wherever they stand.

A passage is found either by the token that starts each chat message (the chat template puts it before a
message's role: ``<|im_start|>``, ``<|start_header_id|>``), so a chat user sends passages as separate messages
and tokenizes nothing, or by the token spans a completions request names.  A passage's key is a hash of its
namespace (model, page format, tenant salt, LoRA) and its token ids only: not of its position nor of what
precedes it, so the same passage is found in any prompt, in any order.  Its stored KV is position-free: keys
are rotated back to position 0 when stored (``rope.rerotate_keys``) and forward to where the passage stands
when reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np

from kvmesh.keys import KEY_BYTES, Namespace, token_bytes

SEGMENT_VERSION = b"kvmesh-passage-v1"


@dataclass(frozen=True, slots=True)
class Segment:
    """Tokens ``[start, end)`` of a prompt that form one passage, and its key (:func:`segment_digest`)."""

    start: int
    end: int
    digest: bytes

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class BadPassageSpans(ValueError):
    """A request named passage spans that are not ordered, disjoint spans inside its prompt."""


def segment_digest(ns: Namespace, tokens: Sequence[int] | np.ndarray) -> bytes:
    """The key of a passage's KV: its namespace and token ids (little-endian uint32), nothing else."""
    data = token_bytes(tokens)
    hasher = blake3.blake3(SEGMENT_VERSION)
    hasher.update(ns)
    hasher.update((len(data) // 4).to_bytes(4, "little"))
    hasher.update(data)
    return hasher.digest(KEY_BYTES)


def split_at_boundaries(tokens: Sequence[int], boundary: int, begin: int, end: int) -> list[tuple[int, int]]:
    """Spans of ``tokens[begin:end]`` that each start at a ``boundary`` token (a message), in order.

    Tokens before the first boundary in the range are not a passage (a cut message); the last span ends at ``end``.
    """
    starts = [index for index in range(begin, end) if tokens[index] == boundary]
    return [(start, stop) for start, stop in zip(starts, starts[1:] + [end]) if stop > start]


def check_spans(spans: Any, prompt_tokens: int) -> list[tuple[int, int]]:
    """Passage spans a request named (``[[start, end], ...]``), checked: ordered, disjoint, in the prompt."""
    if not isinstance(spans, list):
        raise BadPassageSpans(f"kvmesh passages are a list of [start, end] token spans, got {spans!r}")
    checked: list[tuple[int, int]] = []
    for span in spans:
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(v, int) for v in span)):
            raise BadPassageSpans(f"a kvmesh passage span is [start, end] in tokens, got {span!r}")
        start, end = span
        if not 0 <= start < end <= prompt_tokens:
            raise BadPassageSpans(f"passage span [{start}, {end}) is not inside the prompt's {prompt_tokens} tokens")
        if checked and start < checked[-1][1]:
            raise BadPassageSpans(f"passage span [{start}, {end}) overlaps or precedes the span before it")
        checked.append((start, end))
    return checked


def segments_in(tokens: Sequence[int], spans: Sequence[tuple[int, int]], ns: Namespace, begin: int, end: int,
                min_tokens: int) -> list[Segment]:
    """The passages among ``spans`` that lie inside ``[begin, end)`` and are long enough to store, keyed."""
    return [Segment(start, stop, segment_digest(ns, tokens[start:stop])) for start, stop in spans
            if begin <= start and stop <= end and stop - start >= max(1, min_tokens)]


def message_start_token(tokenizer: Any) -> int | None:
    """The special token the model's chat template puts right before a message's role, or None.

    Rendered from the template itself (one user message), so it follows the model: ``<|im_start|>`` for
    ChatML models, ``<|start_header_id|>`` for Llama 3.  None where the template has no such token.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "kvmesh"}], tokenize=True)
    ids = list(rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered)
    role = tokenizer.encode("user", add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    for index in range(1, len(ids) - len(role) + 1):
        if ids[index:index + len(role)] == role and ids[index - 1] in special:
            return int(ids[index - 1])
    return None
