"""What the daemon remembers of requests: loads added to their summaries, and who stored which first chunk."""

from __future__ import annotations

from kvmesh.daemon import requests as book_module
from kvmesh.daemon.requests import RequestBook, identity_difference

OURS = {"model": "fp:aaa", "page_format": "L2.H1.D8.bfloat16", "tenant_salt": "", "cache_salt": "", "lora": ""}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _miss(**extra: object) -> dict[str, object]:
    return {"prompt_tokens": 300, "kvmesh_hit_tokens": 0, "cause": "not_stored",
            "reason": "chunk 0 (tokens 0-127) is not stored: never seen under this namespace", **extra}


def test_a_requests_load_is_its_slowest_rank_and_all_its_bytes() -> None:
    book = RequestBook()
    book.loaded("req-1", rank=0, seconds=0.002, nbytes=1000)
    book.loaded("req-1", rank=0, seconds=0.001, nbytes=500)  # a second KV cache group, after the first
    book.loaded("req-1", rank=1, seconds=0.0025, nbytes=1500)
    book.loaded("req-2", rank=0, seconds=0.5, nbytes=1)
    kept = book.record("req-1", "m", {"prompt_tokens": 10})
    assert kept["load_seconds"] == 0.003 and kept["loaded_bytes"] == 3000
    assert book.record("req-1", "m", {"prompt_tokens": 10}).get("load_seconds") is None  # taken once
    assert book.find("req-1")[0]["load_seconds"] == 0.003
    assert [s["request_id"] for s in book.find()] == ["req-1", "req-1"]


def test_loads_of_requests_that_never_finish_are_dropped_oldest_first(monkeypatch) -> None:
    monkeypatch.setattr(book_module, "LOADS_KEPT", 3)
    book = RequestBook()
    for index in range(5):
        book.loaded(f"req-{index}", 0, 0.1, 10)
    assert "load_seconds" not in book.record("req-0", "m", {}) and "load_seconds" not in book.record("req-1", "m", {})
    assert book.record("req-4", "m", {})["load_seconds"] == 0.1


def test_a_miss_from_the_first_chunk_names_the_namespace_part_that_differs_and_hides_salts() -> None:
    clock = Clock()
    book = RequestBook(clock)
    theirs = {**OURS, "model": "fp:bbb", "tenant_salt": "0123abcd"}
    book.record("theirs", "m", {"prompt_tokens": 300}, b"first", theirs, stored_first_chunk=True)
    clock.now += 42
    kept = book.record("ours", "m", _miss(), b"first", OURS)
    assert kept["cause"] == "namespace"
    assert kept["reason"] == ("chunk 0 is not stored under this request's namespace, but the same tokens were "
                              "stored 42 s ago under a namespace that differs in the model fingerprint (this "
                              "request's fp:aaa, theirs fp:bbb); the tenant salt")
    assert "0123abcd" not in kept["reason"]
    # other tokens, a hit, or a cause other than "never stored": left as they are
    assert book.record("x", "m", _miss(), b"other", OURS)["cause"] == "not_stored"
    assert book.record("y", "m", _miss(cause="evicted"), b"first", OURS)["cause"] == "evicted"
    assert book.record("z", "m", _miss(kvmesh_hit_tokens=128), b"first", OURS)["cause"] == "not_stored"
    # a request that did not store its first chunk is not remembered as having stored it
    book.record("looked", "m", _miss(), b"mine", {**OURS, "lora": "name:adapter"})
    assert book.record("after", "m", _miss(), b"mine", OURS)["cause"] == "not_stored"


def test_identity_difference_shows_fingerprints_and_adapters_and_only_names_salts() -> None:
    theirs = {**OURS, "page_format": "L2.H1.D8.float32", "cache_salt": "beef", "lora": "name:sql"}
    assert identity_difference(OURS, theirs) == [
        "the page format (this request's L2.H1.D8.bfloat16, theirs L2.H1.D8.float32)",
        "the request's cache_salt", "the LoRA adapter (this request's none, theirs name:sql)"]
    assert identity_difference(OURS, dict(OURS)) == []
