#!/usr/bin/env python3
"""Hostile-load figures for docs/SECURITY.md: the real deploy-receiver binary on loopback under
N slow or unsigned clients at once, while /health is timed and a signed upload is sent.

    bench/slow_clients.py [--clients 200] [--seconds 20] [--receiver target/release/deploy-receiver]

Standard library only (signing through bench/signing.py). The clients, in equal shares:
  slow-head      a request head sent a byte a second
  slow-json      POST /deployment/load announcing 100 bytes, sending one a second
  preamble       a multipart upload whose preamble never ends (a MiB a second, no boundary)
  part-headers   a multipart part whose header lines never end
  unsigned       an upload with a bad signature, reconnecting as soon as it is refused
Printed: /health latency (max, p50, p99 over the run), the signed upload's status and time, the
receiver's peak RSS (VmHWM), and how many connections the receiver closed. Everything it starts
is stopped at the end; only 127.0.0.1 is contacted.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from signing import blake3_hex, signature_headers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SECRET = b"deploy-bench-secret-0123456789abcdef"
BOUNDARY = "slow-clients-boundary"
STOP = threading.Event()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vmhwm_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(5)
    return s


def trickle(port, head, byte, every=1.0):
    """Sends `head`, then `byte` every `every` seconds; reconnects when the receiver hangs up."""
    while not STOP.is_set():
        try:
            s = connect(port)
            s.sendall(head)
            while not STOP.is_set():
                time.sleep(every)
                s.sendall(byte)
        except OSError:
            time.sleep(0.2)


def unsigned(port):
    """Bad-signature uploads, one after another."""
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n"
            f"Content-Type: application/json\r\n\r\n{{}}\r\n--{BOUNDARY}--\r\n").encode()
    while not STOP.is_set():
        try:
            s = connect(port)
            s.sendall((f"POST /deployment/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                       f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                       f"Content-Length: {len(body)}\r\nX-Deploy-Key-Id: default\r\n"
                       f"X-Deploy-Timestamp: {int(time.time())}\r\n"
                       f"X-Deploy-Nonce: {uuid.uuid4().hex}\r\nX-Deploy-Signature: {'0' * 64}\r\n"
                       "\r\n").encode() + body)
            s.recv(4096)
            s.close()
        except OSError:
            pass
        time.sleep(0.05)


def flood(port, head, filler):
    """Sends `head`, then `filler` (64 KiB) 16 times a second until refused; reconnects."""
    while not STOP.is_set():
        try:
            s = connect(port)
            s.sendall(head)
            while not STOP.is_set():
                s.sendall(filler)
                time.sleep(1 / 16)
        except OSError:
            time.sleep(0.2)


def upload_head(port, length):
    return (f"POST /deployment/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def health_once(port):
    started = time.perf_counter()
    try:
        s = connect(port)
        s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
                  .encode())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        ok = data.startswith(b"HTTP/1.1 200")
    except OSError:
        ok = False
    return ok, time.perf_counter() - started


def signed_upload(port, size=1 << 20):
    package = os.urandom(size)
    import hashlib  # noqa: F401  (BLAKE3 of the package: the receiver's own check)
    manifest = json.dumps({
        "package_id": str(uuid.uuid4()), "package_checksum": b3_file(package),
        "package_size": size, "compression": "none"}, separators=(",", ":")).encode()
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n"
            f"Content-Type: application/json\r\n\r\n").encode() + manifest + \
        (f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"package\"\r\n"
         f"Content-Type: application/octet-stream\r\n\r\n").encode() + package + \
        f"\r\n--{BOUNDARY}--\r\n".encode()
    authority = f"127.0.0.1:{port}"
    headers = signature_headers(SECRET, "default", authority, "POST", "/deployment/upload",
                                manifest)
    head = (f"POST /deployment/upload HTTP/1.1\r\nHost: {authority}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n")
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    started = time.perf_counter()
    s = connect(port)
    s.settimeout(30)
    s.sendall(head.encode() + body)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return data.split(b" ", 2)[1].decode() if data else "none", time.perf_counter() - started


def b3_file(data):
    """BLAKE3 of `data` through b3sum or Python's blake3, whichever is there."""
    if shutil.which("b3sum"):
        out = subprocess.run(["b3sum", "--no-names"], input=data, capture_output=True, check=True)
        return out.stdout.decode().split()[0]
    try:
        import blake3  # type: ignore
        return blake3.blake3(data).hexdigest()
    except ImportError:
        sys.exit("needs b3sum or Python's blake3 (pip install blake3) to sign a 1 MiB upload")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--receiver", default=str(REPO / "target" / "release" / "deploy-receiver"))
    args = ap.parse_args()
    assert blake3_hex(b"") == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"

    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="slow-clients-"))
    env = dict(os.environ, RECEIVER_BIND=f"127.0.0.1:{port}", PACKAGE_DIR=str(work / "packages"),
               DEPLOY_HMAC_SECRET=SECRET.decode(), ALLOWED_NETWORKS="127.0.0.0/8",
               RUST_LOG="warn", DOCKER_HOST="unix:///nonexistent/slow-clients.sock")
    receiver = subprocess.Popen([args.receiver], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if health_once(port)[0]:
                break
            time.sleep(0.1)
        idle_rss = vmhwm_kib(receiver.pid)
        kinds = [
            ("slow-head", lambda: trickle(port, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode(), b"a")),
            ("slow-json", lambda: trickle(port, (f"POST /deployment/load HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                                 "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode(), b" ")),
            ("preamble", lambda: flood(port, upload_head(port, 96 << 20), b"x" * 65536)),
            ("part-headers", lambda: flood(port, upload_head(port, 96 << 20) +
                                           f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n".encode(),
                                           b"X-Junk: " + b"a" * 65526 + b"\r\n")),
            ("unsigned", lambda: unsigned(port)),
        ]
        threads = []
        for i in range(args.clients):
            _, target = kinds[i % len(kinds)]
            t = threading.Thread(target=target, daemon=True)
            t.start()
            threads.append(t)
        time.sleep(2)
        latencies, failures = [], 0
        upload = None
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            ok, seconds = health_once(port)
            latencies.append(seconds)
            failures += not ok
            if upload is None and time.monotonic() > end - args.seconds / 2:
                upload = signed_upload(port)
            time.sleep(0.2)
        peak = vmhwm_kib(receiver.pid)
        STOP.set()
        latencies.sort()
        p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
        print(f"clients: {args.clients} ({', '.join(k for k, _ in kinds)}), {args.seconds:.0f} s")
        print(f"/health: {len(latencies)} probes, {failures} failed, "
              f"p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {latencies[-1] * 1000:.1f} ms")
        if upload:
            print(f"signed 1 MiB upload during the load: {upload[0]} in {upload[1] * 1000:.0f} ms")
        print(f"receiver peak RSS: {peak / 1024:.1f} MiB (idle {idle_rss / 1024:.1f} MiB)")
        print(f"median /health: {statistics.median(latencies) * 1000:.1f} ms")
    finally:
        STOP.set()
        receiver.terminate()
        try:
            receiver.wait(timeout=40)
        except subprocess.TimeoutExpired:
            receiver.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
