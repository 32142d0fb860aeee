"""Protocol v1 request signing for the bench, Python standard library only.

BLAKE3 is implemented here for inputs of at most one chunk (1024 bytes), which is all the JSON
bodies the bench signs need; it is checked against the known-answer vectors of docs/PROTOCOL.md
by `python3 bench/signing.py`.
"""

import hashlib
import hmac
import secrets
import struct
import time

_IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
       0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
_PERMUTATION = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)
_CHUNK_START, _CHUNK_END, _ROOT = 1, 2, 8
_MASK = 0xFFFFFFFF


def _rotr(x, n):
    return ((x >> n) | (x << (32 - n))) & _MASK


def _g(s, a, b, c, d, x, y):
    s[a] = (s[a] + s[b] + x) & _MASK
    s[d] = _rotr(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & _MASK
    s[b] = _rotr(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b] + y) & _MASK
    s[d] = _rotr(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & _MASK
    s[b] = _rotr(s[b] ^ s[c], 7)


def _compress(cv, block, block_len, flags):
    m = list(struct.unpack("<16I", block))
    s = list(cv) + list(_IV[:4]) + [0, 0, block_len, flags]  # chunk counter 0
    for round_ in range(7):
        _g(s, 0, 4, 8, 12, m[0], m[1])
        _g(s, 1, 5, 9, 13, m[2], m[3])
        _g(s, 2, 6, 10, 14, m[4], m[5])
        _g(s, 3, 7, 11, 15, m[6], m[7])
        _g(s, 0, 5, 10, 15, m[8], m[9])
        _g(s, 1, 6, 11, 12, m[10], m[11])
        _g(s, 2, 7, 8, 13, m[12], m[13])
        _g(s, 3, 4, 9, 14, m[14], m[15])
        if round_ < 6:
            m = [m[i] for i in _PERMUTATION]
    return [s[i] ^ s[i + 8] for i in range(8)]


def blake3_hex(data: bytes) -> str:
    """BLAKE3-256 of `data` (at most 1024 bytes), lowercase hex."""
    if len(data) > 1024:
        raise ValueError("this BLAKE3 handles one chunk (1024 bytes) only")
    blocks = [data[i:i + 64] for i in range(0, len(data), 64)] or [b""]
    cv = _IV
    for i, block in enumerate(blocks):
        flags = (_CHUNK_START if i == 0 else 0)
        if i == len(blocks) - 1:
            flags |= _CHUNK_END | _ROOT
        cv = _compress(cv, block.ljust(64, b"\0"), len(block), flags)
    return struct.pack("<8I", *cv).hex()


def signature_headers(secret: bytes, key_id: str, authority: str, method: str, path: str,
                      body: bytes, timestamp=None, nonce=None) -> dict:
    """The X-Deploy-* headers of a signed request to `authority` (host[:port], as in the Host
    header the client sends) whose signed content is `body`."""
    timestamp = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or secrets.token_urlsafe(24)
    canonical = "\n".join(["DEPLOY-HMAC-SHA256", method, authority.lower(), path, timestamp,
                           nonce, key_id, blake3_hex(body)])
    signature = hmac.new(secret, canonical.encode(), hashlib.sha256).hexdigest()
    return {"X-Deploy-Key-Id": key_id, "X-Deploy-Timestamp": timestamp,
            "X-Deploy-Nonce": nonce, "X-Deploy-Signature": signature}


if __name__ == "__main__":
    assert blake3_hex(b"") == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    manifest = (b'{"package_id":"643f58f6-4f40-4ecf-921f-0001187a7fd6","package_checksum":'
                b'"4aab45689d1790f080f90ec0c755e60ac5735fc47a667e149f0a6316434cdea4",'
                b'"package_size":43022336,"compression":"gzip"}')
    assert blake3_hex(manifest) == "c6ba3ccf9f46a4a824113279c9ba77c1972ba32b96082253514dc0a53e6ed809"
    headers = signature_headers(b"kat-secret-0123456789abcdef0123456789", "default",
                                "192.168.86.200:8001", "POST", "/deployment/upload", manifest,
                                1761393600, "0123456789abcdefABCDEF_-")
    assert headers["X-Deploy-Signature"] == \
        "85cb8f0016122097c5f29e9799bff6d0555203fe55e7226b0a0257eaff0946ab", headers
    get = signature_headers(b"kat-secret-0123456789abcdef0123456789", "default",
                            "Deploy.Example.COM", "GET", "/deployments?limit=10", b"", 1761393600,
                            "0123456789abcdefABCDEF_-")
    assert get["X-Deploy-Signature"] == \
        "0ad0f0c9a5f3ac43004bb8dd74e6e375c510b448fb22ad10ff5bdbfb09269dcd", get
    print("signing: known-answer vectors of docs/PROTOCOL.md pass")
