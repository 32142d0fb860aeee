"""Schemathesis hooks for the deploy services (tests/tests/api_conformance.rs loads them with
SCHEMATHESIS_HOOKS=hooks and this directory on PYTHONPATH).

Every request to the receiver's signed endpoints (/deployment/*, /deployments*) is signed with the
receiver's key, as docs/PROTOCOL.md describes (bench/signing.py is the same scheme): the generated
X-Deploy-* values are replaced by a valid signature over the receiver's authority (the Host header)
and the exact bytes sent (the JSON body, or the `manifest` part of a multipart body). Cases whose
headers schemathesis made invalid on purpose (negative mode), and requests a check sent without one
of the four headers, are left as they are, so the receiver must refuse them.
"""

import hashlib
import hmac
import os
import re
import secrets
import time
from urllib.parse import urlsplit

import blake3
import requests
import schemathesis
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode

SECRET = os.environ.get("DEPLOY_HMAC_SECRET", "").encode()
KEY_ID = os.environ.get("DEPLOY_HMAC_KEY_ID", "default")
SIGNED = ("x-deploy-key-id", "x-deploy-timestamp", "x-deploy-nonce", "x-deploy-signature")


def manifest_part(content_type: str, body: bytes) -> bytes:
    """The bytes of the `manifest` part of a multipart body, or the whole body if there is none."""
    match = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if not match:
        return body
    delimiter = b"--" + match.group(1).encode()
    for part in body.split(delimiter):
        head, sep, content = part.partition(b"\r\n\r\n")
        if sep and re.search(rb'name="manifest"', head):
            return content[:-2] if content.endswith(b"\r\n") else content
    return body


class Sign(requests.auth.AuthBase):
    def __call__(self, request):
        present = {name.lower() for name in request.headers}
        if not request.path_url.startswith("/deployment") or not all(h in present for h in SIGNED):
            return request
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        content_type = request.headers.get("Content-Type", "")
        if content_type.startswith("multipart/"):
            body = manifest_part(content_type, body)
        timestamp = str(int(time.time()))
        nonce = secrets.token_urlsafe(24)
        # The authority line: the Host header as sent (requests sends the URL's host[:port]).
        authority = (request.headers.get("Host") or urlsplit(request.url).netloc).lower()
        canonical = "\n".join(["DEPLOY-HMAC-SHA256", request.method, authority, request.path_url,
                               timestamp, nonce, KEY_ID, blake3.blake3(body).hexdigest()])
        for name in list(request.headers):
            if name.lower() in SIGNED:
                del request.headers[name]
        request.headers.update({
            "X-Deploy-Key-Id": KEY_ID,
            "X-Deploy-Timestamp": timestamp,
            "X-Deploy-Nonce": nonce,
            "X-Deploy-Signature": hmac.new(SECRET, canonical.encode(), hashlib.sha256).hexdigest(),
        })
        return request


SIGN = Sign()


@schemathesis.hook
def before_call(context, case, kwargs):
    meta = case.meta
    headers = meta.components.get(ParameterLocation.HEADER) if meta is not None else None
    if headers is not None and headers.mode == GenerationMode.NEGATIVE:
        return
    kwargs["auth"] = SIGN
