"""Deterministic workloads built from real text: multi-round QA and long-document QA.

Every prompt is fixed in advance (token ids), so that the same requests reach
every compared system and their answers can be compared token for token.  In
multi-round QA the history of a user grows round by round with canned answers
(sentences of real text) rather than with the system's own answers, which
would make later prompts differ between systems.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvmesh.bench.texts import Tokenizer, document_token_ids, topic_texts


@dataclass(frozen=True, slots=True)
class Request:
    user: int
    round: int
    prompt: list[int]
    passages: tuple[tuple[int, int], ...] = ()  # token spans of reusable passages (RAG), for blending systems


@dataclass(frozen=True, slots=True)
class MultiRoundSpec:
    users: int = 20
    rounds: int = 4
    system_tokens: int = 200  # shared by every user
    context_tokens: int = 1500  # each user's own document, before round 1
    turn_tokens: int = 60  # question + canned answer added to the history per round
    seed: int = 0


def multi_round(tokenizer: Tokenizer, spec: MultiRoundSpec) -> list[Request]:
    """Round-robin over users: every user's round r comes before any user's round r+1."""
    docs = document_token_ids(tokenizer, spec.users + 1, max(spec.context_tokens, spec.system_tokens),
                              seed=spec.seed)
    system = tokenizer.encode("You are a helpful assistant. Answer questions about the document.\n\n",
                              add_special_tokens=False) + docs[-1][:spec.system_tokens]
    sentences = _sentences(spec.seed)
    rng = random.Random(spec.seed)
    requests: list[Request] = []
    histories = [system + tokenizer.encode("\n\nDocument:\n", add_special_tokens=False) + docs[u][:spec.context_tokens]
                 for u in range(spec.users)]
    for round_index in range(spec.rounds):
        for user in range(spec.users):
            question = tokenizer.encode(f"\n\nQuestion {round_index + 1}: {rng.choice(sentences)}\nAnswer:",
                                        add_special_tokens=False)
            prompt = histories[user] + question
            requests.append(Request(user, round_index, prompt))
            canned = tokenizer.encode(" " + " ".join(rng.sample(sentences, 3)), add_special_tokens=False)
            histories[user] = prompt + canned[:max(1, spec.turn_tokens - len(question))]
    return requests


def _sentences(seed: int) -> list[str]:
    pieces = []
    for text in topic_texts():
        pieces += [s.strip() for s in text.replace("\n", " ").split(". ") if 30 < len(s.strip()) < 160]
    random.Random(seed).shuffle(pieces)
    return pieces[:2000]


@dataclass(frozen=True, slots=True)
class LongDocSpec:
    documents: int = 8
    document_tokens: int = 3000
    visits: int = 3  # how many times each document is asked about
    order: str = "round_robin"  # or "random": revisits in a shuffled order
    seed: int = 0


def long_doc(tokenizer: Tokenizer, spec: LongDocSpec) -> list[Request]:
    """Questions about N documents, revisiting each ``visits`` times (the working set can exceed the pool)."""
    from kvmesh.bench.texts import question_prompt

    docs = document_token_ids(tokenizer, spec.documents, spec.document_tokens, seed=spec.seed)
    sentences = _sentences(spec.seed)
    rng = random.Random(spec.seed)
    visits = [(doc, visit) for visit in range(spec.visits) for doc in range(spec.documents)]
    if spec.order == "random":
        rng.shuffle(visits)
    elif spec.order != "round_robin":
        raise ValueError(f"order must be round_robin or random, got {spec.order!r}")
    seen: dict[int, int] = {}
    requests = []
    for doc, _ in visits:
        round_index = seen.get(doc, 0)
        seen[doc] = round_index + 1
        requests.append(Request(doc, round_index, question_prompt(tokenizer, docs[doc], rng.choice(sentences))))
    return requests


@dataclass(frozen=True, slots=True)
class RagSpec:
    passages: int = 24
    passage_tokens: int = 400
    per_request: int = 4  # k passages per request, in varying order
    requests: int = 40
    seed: int = 0


def rag(tokenizer: Tokenizer, spec: RagSpec) -> list[Request]:
    """Each request: k passages from a pool, in varying order, then a question.

    ``user`` is the request's first passage and ``round`` how many earlier
    requests began with it, so "returning" requests are those whose prefix was
    seen before.
    """
    pool = document_token_ids(tokenizer, spec.passages, spec.passage_tokens, seed=spec.seed)
    sentences = _sentences(spec.seed)
    rng = random.Random(spec.seed)
    seen: dict[int, int] = {}
    requests = []
    for _ in range(spec.requests):
        chosen = rng.sample(range(spec.passages), spec.per_request)
        prompt = tokenizer.encode("Answer from these passages.\n\n", add_special_tokens=False)
        spans = []
        for index in chosen:
            spans.append((len(prompt), len(prompt) + len(pool[index])))
            prompt += pool[index] + tokenizer.encode("\n\n", add_special_tokens=False)
        prompt += tokenizer.encode(f"Question: {rng.choice(sentences)}\nAnswer:", add_special_tokens=False)
        round_index = seen.get(chosen[0], 0)
        seen[chosen[0]] = round_index + 1
        requests.append(Request(chosen[0], round_index, prompt, tuple(spans)))
    return requests
