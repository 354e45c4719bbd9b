from transformers import AutoTokenizer

from kvmesh.bench.workloads import MultiRoundSpec, multi_round
from kvmesh.demo.model import default_model_dir, prepare_demo_model


def _tokenizer():
    return AutoTokenizer.from_pretrained(prepare_demo_model(default_model_dir()), local_files_only=True)


def test_multi_round_is_deterministic_and_histories_grow_as_prefixes() -> None:
    tokenizer = _tokenizer()
    spec = MultiRoundSpec(users=3, rounds=3, system_tokens=50, context_tokens=200, turn_tokens=40, seed=5)
    first, second = multi_round(tokenizer, spec), multi_round(tokenizer, spec)
    assert [r.prompt for r in first] == [r.prompt for r in second]
    assert [(r.round, r.user) for r in first] == [(r, u) for r in range(3) for u in range(3)]
    by_user = {u: [r.prompt for r in first if r.user == u] for u in range(3)}
    for prompts in by_user.values():
        for earlier, later in zip(prompts, prompts[1:]):
            assert later[:len(earlier)] == earlier  # each round extends the previous prompt
    system = first[0].prompt[:50]
    assert all(r.prompt[:50] == system for r in first)  # one shared system prompt
    other_seed = multi_round(tokenizer, MultiRoundSpec(users=3, rounds=3, system_tokens=50, context_tokens=200,
                                                       turn_tokens=40, seed=6))
    assert [r.prompt for r in other_seed] != [r.prompt for r in first]
