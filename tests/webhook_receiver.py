"""A webhook endpoint for tests: a real HTTP server on 127.0.0.1 that checks each signature the way
the Standard Webhooks convention describes it, with its own HMAC code (not the service's)."""

import base64
import hashlib
import hmac
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
TOLERANCE_SECONDS = 300  # the convention's suggested window for webhook-timestamp


def signature_is_valid(secret: str, headers, body: bytes, now: float) -> bool:
    """A receiver's check, from the convention's text: the key is the base64 after "whsec_"; the
    signed content is "{webhook-id}.{webhook-timestamp}.{body}"; webhook-signature lists
    space-separated "v1,<base64 HMAC-SHA256>" entries, any of which may match; the timestamp must
    be recent."""
    key = base64.b64decode(secret.split("_", 1)[1])
    message_id, timestamp = headers.get("webhook-id"), headers.get("webhook-timestamp")
    if not message_id or not timestamp or abs(now - int(timestamp)) > TOLERANCE_SECONDS:
        return False
    signed = message_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    for entry in headers.get("webhook-signature", "").split(" "):
        version, _, signature = entry.partition(",")
        if version == "v1" and hmac.compare_digest(signature.encode(), expected):
            return True
    return False


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    signed: bool
    answered: int


@dataclass
class Receiver:
    """A webhook endpoint: answers 400 to a bad signature, else the next of `answers` (then 204)."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    def take(self, headers: dict[str, str], body: bytes) -> int:
        signed = signature_is_valid(SECRET, headers, body, time.time())
        answer = 400 if not signed else (self.answers.pop(0) if self.answers else 204)
        self.received.append(Received(headers, body, signed, answer))
        return answer


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    endpoint = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(endpoint.take({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/qforget"
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
