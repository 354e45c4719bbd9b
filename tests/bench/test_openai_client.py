"""The streaming client against a small real HTTP server whose timing we control."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvmesh.bench.openai_client import EndpointError, stream_completion

FIRST_DELAY = 0.4
GAP = 0.1


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["model"] == "broken":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "no such model"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(FIRST_DELAY)
        for index in range(body["max_tokens"]):
            if index:
                time.sleep(GAP)
            event = {"choices": [{"index": 0, "text": f"t{index} "}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_ttft_latency_and_text(server_url: str) -> None:
    result = stream_completion(server_url, "m", [1, 2, 3], max_tokens=4)
    assert result.text == "t0 t1 t2 t3 "
    assert FIRST_DELAY <= result.ttft < FIRST_DELAY + GAP  # the first token, not the headers
    assert result.latency >= FIRST_DELAY + 3 * GAP
    assert result.inter_token_latency is not None and result.inter_token_latency >= GAP * 0.9
    assert (result.prompt_tokens, result.completion_tokens) == (3, 4)


def test_http_error_is_raised_with_the_servers_words(server_url: str) -> None:
    with pytest.raises(EndpointError, match="400.*no such model"):
        stream_completion(server_url, "broken", "hi", max_tokens=2)
