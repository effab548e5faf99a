"""A tiny OpenAI-compatible chat-completions server for the judge tests (http.server on 127.0.0.1, a thread).

What it answers is decided by the caption inside the question (``Text Caption: [CAPTION]``):

- ``say:TEXT``      answer TEXT (e.g. ``say:Final Score: 4``);
- ``fail:N:TEXT``   answer 500 to the first N requests for this caption, then TEXT;
- ``sleep:S:TEXT``  wait S seconds, then answer TEXT (a client with a shorter timeout gives up);
- anything else     answer ``Final Score: 3``, or with ``by_brightness`` a score of the image itself:
                    1 + 4 × its mean pixel value (a stand-in judge that sees the image, for examples).

A request for a model other than ``model`` gets 404 (as vLLM / sglang answer); ``GET /v1/models`` lists
``model``. Every request is recorded (path, headers, JSON body) and the peak number in flight is tracked.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CAPTION = re.compile(r"Text Caption: \[(.*)\]\s*$", re.S)


def _mean_pixel(body: dict[str, Any]) -> float:
    import base64
    import io

    import numpy as np
    from PIL import Image

    url = next(p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return float(np.asarray(image, dtype=np.float64).mean() / 255)


class FakeJudgeServer:
    def __init__(self, model: str = "UnifiedReward-test", models_endpoint: bool = True,
                 by_brightness: bool = False) -> None:
        self.model = model
        self.by_brightness = by_brightness
        self.models_endpoint = models_endpoint
        self.requests: list[dict[str, Any]] = []
        self.failures: dict[str, int] = {}
        self.in_flight = 0
        self.peak = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                server._record(self, None)
                if self.path.rstrip("/") == "/v1/models" and server.models_endpoint:
                    data = [{"id": server.model, "object": "model", "created": 0, "owned_by": "test"}]
                    self._send(200, {"object": "list", "data": data})
                else:
                    self._send(404, {"error": {"message": "not found", "type": "not_found", "code": 404}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server._record(self, body)
                with server.lock:
                    server.in_flight += 1
                    server.peak = max(server.peak, server.in_flight)
                try:
                    status, payload = server._answer(body)
                    self._send(status, payload)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeJudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _record(self, handler: BaseHTTPRequestHandler, body: dict[str, Any] | None) -> None:
        with self.lock:
            self.requests.append({"method": handler.command, "path": handler.path,
                                  "headers": {k.lower(): v for k, v in handler.headers.items()}, "body": body})

    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "POST"]

    def _answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if body.get("model") != self.model:
            message = f"The model `{body.get('model')}` does not exist."
            return 404, {"error": {"message": message, "type": "NotFoundError", "code": 404}}
        text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
        match = CAPTION.search(text)
        caption = match.group(1) if match else ""
        answer = "Final Score: 3"
        if caption.startswith("say:"):
            answer = caption[4:]
        elif caption.startswith("fail:"):
            _, n, answer = caption.split(":", 2)
            with self.lock:
                seen = self.failures.get(caption, 0)
                self.failures[caption] = seen + 1
            if seen < int(n):
                return 500, {"error": {"message": "overloaded", "type": "InternalServerError", "code": 500}}
        elif caption.startswith("sleep:"):
            _, seconds, answer = caption.split(":", 2)
            time.sleep(float(seconds))
        elif self.by_brightness:
            answer = f"Final Score: {1 + 4 * _mean_pixel(body):.4f}"
        return 200, {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": self.model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
