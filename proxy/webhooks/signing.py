"""Standard Webhooks' signature (https://www.standardwebhooks.com): `webhook-signature: v1,<base64 of
HMAC-SHA256 over "<id>.<timestamp>.<body>">`, keyed with the secret's bytes (`whsec_<base64>`).

Written here, not taken from the `standardwebhooks` package: the tests verify every delivery with that
package, the reference implementation, which proves nothing if it also made the signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secret, msg_id, timestamp, body)}
