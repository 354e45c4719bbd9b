"""A minimal streaming client for OpenAI-compatible completion endpoints, timing what users feel.

Standard library only (http.client), so it adds nothing to the install and
runs the same against vLLM, vLLM with kvmesh, or any other server.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


class EndpointError(RuntimeError):
    """The server answered with an error or closed the stream early."""


@dataclass(frozen=True, slots=True)
class CompletionResult:
    text: str
    ttft: float  # seconds from sending the request to the first generated token
    latency: float  # seconds from sending the request to the end of the stream
    token_times: list[float]  # arrival time of each streamed chunk after the request was sent
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server reports it
    headers: dict[str, str] = field(default_factory=dict)  # the response's headers, names in lower case

    @property
    def inter_token_latency(self) -> float | None:
        gaps = [b - a for a, b in zip(self.token_times, self.token_times[1:])]
        return sum(gaps) / len(gaps) if gaps else None


def stream_completion(base_url: str, model: str, prompt: str | list[int], max_tokens: int,
                      temperature: float = 0.0, timeout: float = 900.0, ignore_eos: bool = True,
                      extra: dict[str, object] | None = None) -> CompletionResult:
    """Send one streaming completion request and time it (``extra``: more fields of the request body)."""
    parts = urlsplit(base_url)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                       "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos,
                       **(extra or {})})
    if parts.hostname is None:
        raise ValueError(f"not an http URL: {base_url!r}")
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    started = time.perf_counter()
    try:
        connection.request("POST", parts.path.rstrip("/") + "/v1/completions", body,
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise EndpointError(f"HTTP {response.status}: {response.read()[:500]!r}")
        headers = {name.lower(): value for name, value in response.getheaders()}
        pieces: list[str] = []
        times: list[float] = []
        usage: dict[str, Any] = {}
        done = False
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                times.append(time.perf_counter() - started)
                pieces.append(choice.get("text", ""))
        latency = time.perf_counter() - started
    finally:
        connection.close()
    if not done or not times:
        raise EndpointError("the stream ended before any token or without [DONE]")
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return CompletionResult("".join(pieces), times[0], latency, times, usage.get("prompt_tokens"),
                            usage.get("completion_tokens"), cached, headers)


def wait_until_ready(base_url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``/v1/models`` until the server answers; fail early if its process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise EndpointError(f"the server exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base_url.rstrip("/") + "/v1/models", timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise EndpointError(f"{base_url} was not ready within {timeout:.0f}s")
