"""The streaming client against a small real HTTP server whose timing we control."""

import pytest

from conftest import FIRST_DELAY, GAP
from kvmesh.bench.openai_client import EndpointError, stream_completion


def test_ttft_latency_and_text(server_url: str) -> None:
    result = stream_completion(server_url, "m", [1, 2, 3], max_tokens=4)
    assert result.text == "t0 t1 t2 t3 "
    assert FIRST_DELAY <= result.ttft < FIRST_DELAY + GAP  # the first token, not the headers
    assert result.latency >= FIRST_DELAY + 3 * GAP
    assert result.inter_token_latency is not None and result.inter_token_latency >= GAP * 0.9
    assert (result.prompt_tokens, result.completion_tokens) == (3, 4)


def test_cached_tokens_and_headers(server_url: str) -> None:
    result = stream_completion(server_url, "m", [1, 2, 3], max_tokens=1)
    assert result.cached_tokens == 2  # usage.prompt_tokens_details.cached_tokens of the last chunk
    assert result.headers["x-kvmesh-engine"] == "http://engine-a"  # names in lower case


def test_http_error_is_raised_with_the_servers_words(server_url: str) -> None:
    with pytest.raises(EndpointError, match="400.*no such model"):
        stream_completion(server_url, "broken", "hi", max_tokens=2)
