"""Signing a delivery as the Standard Webhooks convention says (https://www.standardwebhooks.com).

The signed content is "{webhook-id}.{webhook-timestamp}.{body}"; the signature is its HMAC-SHA256
under the key the whsec_ secret stands for, base64, prefixed with the version "v1,". The id stays
the same on every attempt of a delivery (receivers drop what they have seen); the timestamp is the
attempt's, so that receivers can refuse replays of old messages.
"""

import base64
import hashlib
import hmac


def signature_headers(key: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The webhook-id, webhook-timestamp (unix seconds) and webhook-signature headers of `body`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": f"v1,{signature}"}
