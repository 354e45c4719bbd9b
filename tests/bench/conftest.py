"""A small real streaming server with known timing, for the client, runner and report tests."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

FIRST_DELAY = 0.5
GAP = 0.3


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["model"] == "broken":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "no such model"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("X-Kvmesh-Engine", "http://engine-a")  # as `kvmesh router` marks its answers
        self.end_headers()
        time.sleep(FIRST_DELAY)
        for index in range(body["max_tokens"]):
            if index:
                time.sleep(GAP)
            event = {"choices": [{"index": 0, "text": f"t{index} "}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        usage = {"choices": [],
                 "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"],
                           "prompt_tokens_details": {"cached_tokens": len(body["prompt"]) - 1}}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


