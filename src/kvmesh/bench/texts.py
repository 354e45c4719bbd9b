"""Real English text for workloads: the documentation topics that ship with Python (``pydoc_data``)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def topic_texts() -> list[str]:
    """Every topic's text, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def document_token_ids(tokenizer: Tokenizer, count: int, tokens_each: int, seed: int = 0) -> list[list[int]]:
    """``count`` documents of exactly ``tokens_each`` tokens, sharing no text (topics taken in a shuffled order).

    Each document starts at a topic where the text allows; for many long documents they are consecutive
    slices of one stream of topics.
    """
    texts = topic_texts()
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    documents: list[list[int]] = []
    current: list[int] = []
    for index in order:
        current += tokenizer.encode(texts[index] + "\n\n", add_special_tokens=False)
        while len(current) >= tokens_each and len(documents) < count:
            documents.append(current[:tokens_each])
            current = []
        if len(documents) == count:
            return documents
    # Not enough when every document starts at a topic: cut one continuous stream instead (still disjoint).
    stream = [t for index in order for t in tokenizer.encode(texts[index] + "\n\n", add_special_tokens=False)]
    if len(stream) < count * tokens_each:
        raise ValueError(f"Python's documentation holds fewer than {count} x {tokens_each} tokens")
    return [stream[i * tokens_each:(i + 1) * tokens_each] for i in range(count)]


def question_prompt(tokenizer: Tokenizer, document: Sequence[int], question: str) -> list[int]:
    """A document followed by a question, as token ids (exact lengths, no re-tokenization surprises)."""
    suffix = tokenizer.encode(f"\n\nQuestion: {question}\nAnswer:", add_special_tokens=False)
    return list(document) + suffix
