"""A scripted OpenAI-compatible `/chat/completions` server on 127.0.0.1, for the endpoint-backed judges/reflectors."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedChatServer:
    """`respond(body) -> str | int | dict`: the reply text, an HTTP error status, or a raw JSON payload.

    Every request is recorded in `requests` as `{"path", "auth", "body"}`; use as a context manager.
    """

    def __init__(self, respond, usage=None):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                answer = respond(body)
                if isinstance(answer, int):
                    self.send_response(answer)
                    self.end_headers()
                    self.wfile.write(b'{"error": "scripted failure"}')
                    return
                if isinstance(answer, dict):
                    payload = answer
                else:
                    payload = {"choices": [{"message": {"role": "assistant", "content": answer}}]}
                    if usage is not None:
                        payload["usage"] = usage
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
