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
