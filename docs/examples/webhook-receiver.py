"""A data owner's webhook endpoint for qforget, with the standard library only: it checks each
delivery's signature as the Standard Webhooks convention says (docs/webhooks.md), answers 204 to a
good one and 400 to anything else, and appends every verified event to a JSON-lines file.

    QFORGET_WEBHOOK_SECRET=whsec_... python docs/examples/webhook-receiver.py PORT EVENTS_FILE

Where it says "delete", a real owner deletes the subject's records before answering: qforget takes
the 2xx to request.erased as the owner's acknowledgement.
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

KEY = base64.b64decode(os.environ["QFORGET_WEBHOOK_SECRET"].removeprefix("whsec_"))
TOLERANCE_SECONDS = 300  # refuse a timestamp further from this clock: a replayed delivery
seen: set[str] = set()  # webhook-ids handled (delivery is at least once); keep them in your database


def verified(headers, body: bytes) -> bool:
    message_id, timestamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "0")
    if not message_id or abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
        return False
    digest = hmac.new(KEY, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(digest).decode()
    return any(hmac.compare_digest(candidate, expected) for candidate in headers.get("webhook-signature", "").split())


class Hooks(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if not verified(self.headers, body):
            self.send_response(400)
        else:
            if self.headers["webhook-id"] not in seen:
                event = json.loads(body)
                if event["type"] == "request.erased":
                    pass  # delete event["data"]["subject_id"]'s records at event["data"]["samples"]
                with open(EVENTS_FILE, "a") as events:
                    events.write(json.dumps({"webhook-id": self.headers["webhook-id"], **event}) + "\n")
                seen.add(self.headers["webhook-id"])
            self.send_response(204)  # answer quickly; do slow work after
        self.end_headers()

    def log_message(self, *_args):
        pass


if __name__ == "__main__":
    EVENTS_FILE = sys.argv[2]
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Hooks).serve_forever()
