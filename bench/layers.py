#!/usr/bin/env python3
"""Layer-aware transfer bench (protocol v2): real deploy-sender and deploy-receiver binaries
(target/release), real cold target hosts (extra Docker engines, each in its own network
namespace, as ../shared/TEST-HOSTS.md describes), and bytes on the wire counted by a loopback TCP
proxy in front of each receiver (client-to-receiver bytes, HTTP headers included). One run,
figures side by side. Needs root (network namespaces), Docker, GNU time, /bin/busybox.

    bench/layers.py                 # 128 MiB base + 16 MiB top, 96 MiB cut, 1 GiB RSS run
    bench/layers.py --rss-mib 256   # a smaller image for the RSS row
    bench/layers.py --content binaries   # cold and RSS images of real programs (compressible)

Rows: (1) redeploy after a top-layer-only change: wire bytes vs that layer's compressed size;
(2) the same image again; (3) a second host sharing the base: sender CPU vs the first host's;
(4) a connection cut at 60 % of a 96 MiB incompressible layer: total sent vs the layer;
(5) cold deploy to "loaded" vs `docker save | DOCKER_HOST=cold docker load` (the default path:
a host holding none of the layers gets the image streamed, `/deployment/stream`), and the same
deploy in a comparison setting side by side (by default as layers, `DEPLOY_STREAM_COLD=0`;
`--compare-env KEY=VALUE`, `--compare-receiver PATH` and `--compare-sender PATH` choose another,
e.g. `--compare-env DEPLOY_STREAM_COLD=0 --compare-env DEPLOY_AWAIT_BLOBS=0`, or an older
receiver or sender binary; `--compare-full` deploys the whole image as one v1 package (`deploy
--full`), the path every deploy took before protocol v2); (6) peak RSS of both services moving an
image of --rss-mib to a cold host (streamed). Rows 1-4 are about layers: their deploys run with
`DEPLOY_STREAM_COLD=0`. See docs/PERFORMANCE.md.
"""

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (run, Service, free_port, wait_http, Measured)

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
BIN = REPO / "target/release"
SECRET = "deploy-bench-layers-secret-0123456789abcdef"
TAG = f"ltxb{os.getpid() % 10000}"


class Proxy:
    """Loopback TCP proxy: counts client->server bytes; cuts every connection once `cut_at`
    total bytes have passed (then forwards normally)."""

    def __init__(self, upstream_port):
        self.sent = 0
        self.cut_at = None
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.upstream = upstream_port
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()
            threading.Thread(target=self._up, args=(client, server), daemon=True).start()

    def _down(self, src, dst):
        try:
            while data := src.recv(256 * 1024):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _up(self, src, dst):
        try:
            while data := src.recv(256 * 1024):
                with self.lock:
                    if self.cut_at is not None and self.sent + len(data) >= self.cut_at:
                        take = max(0, self.cut_at - self.sent)
                        self.cut_at = None
                        dst.sendall(data[:take])
                        self.sent += take
                        raise OSError("cut")
                    self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


class Host:
    """A cold Docker engine in its own network namespace."""

    def __init__(self, n, work):
        self.tag = f"{TAG}h{n}"
        self.root = Path(tempfile.mkdtemp(prefix=f"test-host-{self.tag}-"))
        (self.root / "daemon.json").write_text("{}")
        subprocess.run(["ip", "netns", "add", self.tag], check=True)
        subprocess.run(["ip", "netns", "exec", self.tag, "ip", "link", "set", "lo", "up"], check=True)
        containerd = next(p for p in ["/var/run/docker/containerd/containerd.sock",
                                      "/run/containerd/containerd.sock"] if Path(p).exists())
        self.log = open(self.root / "dockerd.log", "wb")
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{self.tag}", "dockerd",
             "--config-file", str(self.root / "daemon.json"), "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "pid"),
             "--host", f"unix://{self.root}/docker.sock", "--storage-driver", "fuse-overlayfs",
             "--containerd", containerd, "--containerd-namespace", self.tag,
             "--containerd-plugins-namespace", self.tag + "p"],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        self.docker_host = f"unix://{self.root}/docker.sock"
        deadline = time.time() + 60
        while subprocess.run(["docker", "info"], env=self.env(), capture_output=True).returncode:
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"host {self.tag} did not start: {(self.root / 'dockerd.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def env(self):
        return dict(os.environ, DOCKER_HOST=self.docker_host)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(f"grep ' {self.root}' /proc/mounts | cut -d' ' -f2 | sort -r | xargs -r -n1 umount -l",
                       shell=True, check=False)
        subprocess.run(["ip", "netns", "del", self.tag], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def receiver(host, work, name, binary=None):
    port = bench.free_port()
    pkg = work / f"{name}-receiver"
    shutil.rmtree(pkg, ignore_errors=True)
    pkg.mkdir(parents=True)
    # The sender addresses the counting proxy: the receiver answers to it (RECEIVER_AUTHORITIES).
    proxy = Proxy(port)
    env = dict(os.environ, RECEIVER_BIND=f"127.0.0.1:{port}", PACKAGE_DIR=str(pkg),
               DEPLOY_HMAC_SECRET=SECRET, ALLOWED_NETWORKS="127.0.0.0/8", RUST_LOG="warn",
               DOCKER_HOST=host.docker_host, RECEIVER_AUTHORITIES=f"127.0.0.1:{proxy.port}")
    service = bench.Service([str(binary or BIN / "deploy-receiver")], env,
                            work / f"{name}-receiver.log")
    bench.wait_http(f"http://127.0.0.1:{port}/health")
    return service, proxy


def system_binaries():
    """The bytes of this machine's programs and libraries (/usr/bin, /usr/lib, ...), file after
    file in name order, round and round: what an application image's layers mostly hold, and
    about as compressible (zstd level 3 makes them 2.5-3x smaller)."""
    while True:
        for top in ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/libexec", "/usr/share"):
            for root, dirs, names in os.walk(top):
                dirs.sort()
                for name in sorted(names):
                    path = os.path.join(root, name)
                    if os.path.islink(path) or not os.path.isfile(path):
                        continue
                    try:
                        with open(path, "rb") as f:
                            while chunk := f.read(4 * MIB):
                                yield chunk
                    except OSError:
                        continue


BINARIES = system_binaries()


def fill(f, size, content):
    left = size
    while left:
        if content == "random":
            chunk = os.urandom(min(left, 4 * MIB))
        else:
            chunk = next(BINARIES)[:left]
        f.write(chunk)
        left -= len(chunk)


def build(tag, dockerfile, files, content="random"):
    with tempfile.TemporaryDirectory() as ctx:
        shutil.copy("/bin/busybox", Path(ctx) / "busybox")
        for name, size in files.items():
            with open(Path(ctx) / name, "wb") as f:
                fill(f, size, content)
        (Path(ctx) / "Dockerfile").write_text(dockerfile)
        subprocess.run(["docker", "build", "-q", "-t", tag, ctx], check=True, capture_output=True,
                       env=dict(os.environ, DOCKER_BUILDKIT="0"))
    return tag


def deploy(image, proxy, name, pkg_dir, full=False, extra_env=None, health="none", sender=None,
           extra_args=()):
    argv = [str(sender or BIN / "deploy-sender"), "deploy", "--image", image, "--name", name,
            "--health", health, "--to", proxy.url, "--json"] + (["--full"] if full else [])
    argv += list(extra_args)
    env = dict(os.environ, PACKAGE_DIR=str(pkg_dir), DEPLOY_HMAC_SECRET=SECRET, RUST_LOG="warn",
               **(extra_env or {}))
    before = proxy.sent
    m = bench.run(argv, env=env, check=False)
    if m.rc != 0:
        raise RuntimeError(f"deploy of {image} failed: {m.out[-2000:]} {m.err[-2000:]}")
    outcome = json.loads(m.out)
    return m, outcome, proxy.sent - before


def time_to_healthy(host, container, wait=30.0):
    """Seconds from the container's start to the end of its first passing Docker health check,
    as the target's engine recorded them (waiting up to `wait` s for Docker's own first check:
    the receiver may have judged the container healthy by running the check itself before)."""
    def ts(value):
        # RFC 3339 with nanoseconds: keep microseconds for fromisoformat.
        head, _, frac = value.rstrip("Z").partition(".")
        return datetime.datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()

    give_up = time.time() + wait
    while True:
        out = subprocess.run(["docker", "inspect", "--format", "{{json .State}}", container],
                             env=dict(os.environ, DOCKER_HOST=host.docker_host),
                             capture_output=True, text=True, check=True).stdout
        state = json.loads(out)
        passed = [e for e in (state["Health"]["Log"] or []) if e["ExitCode"] == 0]
        if passed:
            return ts(passed[0]["End"]) - ts(state["StartedAt"])
        if time.time() > give_up:
            raise RuntimeError(f"{container}: no passing Docker health check within {wait} s")
        time.sleep(0.1)


def blob_checks(proxy):
    """The receiver's completed blobs by who checked their diffID (`upload` or `load`)."""
    import urllib.request
    with urllib.request.urlopen(f"{proxy.url}/metrics", timeout=5) as r:
        text = r.read().decode()
    prefix = "deploy_receiver_blob_checks_total{by=\""
    found = {l[len(prefix):].split('"')[0]: int(float(l.rsplit(" ", 1)[1]))
             for l in text.splitlines() if l.startswith(prefix)}
    return f"blob checks by load {found.get('load', 0)}, by upload {found.get('upload', 0)}"


def before_send(outcome):
    """What a deploy's --json says of its time before the receiver's stages: a release's prepare
    and inventory-to-answer, or a v1 package's size and request time."""
    if "prepare" in outcome:
        return (f"prepare {outcome['prepare']['duration_ms']} ms,"
                f" transfer+load {outcome['transfer_duration_ms']} ms")
    return (f"package {outcome['package']['package_size']} B,"
            f" request {outcome['transfer']['request_duration_ms']} ms")


def stage(record, name):
    return next((s["duration_ms"] for s in record.get("stages", []) if s["stage"] == name), 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-mib", type=int, default=128)
    ap.add_argument("--top-mib", type=int, default=16)
    ap.add_argument("--cut-mib", type=int, default=96)
    ap.add_argument("--cold-runs", type=int, default=3,
                    help="cold-deploy runs (fresh hosts and sender cache each); the median is shown")
    ap.add_argument("--rss-mib", type=int, default=1024)
    ap.add_argument("--content", choices=("random", "binaries"), default="random",
                    help="what the cold and RSS images' layers hold: random bytes (incompressible,"
                         " the default) or this machine's programs and libraries (compressible like"
                         " a real application image); the other images are always random")
    ap.add_argument("--work", default=str(REPO / "target/bench-layers"))
    ap.add_argument("--bin-dir", default=str(REPO / "target/release"),
                    help="where deploy-sender and deploy-receiver are (default target/release)")
    ap.add_argument("--compare-env", action="append", metavar="KEY=VALUE",
                    help="the cold comparison deploy's sender environment (repeatable; default"
                         " DEPLOY_STREAM_COLD=0 unless --compare-receiver, --compare-sender or"
                         " --compare-full is given)")
    ap.add_argument("--compare-receiver", metavar="PATH",
                    help="the receiver binary of the cold comparison deploy's host (default: --bin-dir's)")
    ap.add_argument("--arg", action="append", default=[], metavar="ARG",
                    help="an extra `deploy` argument for the cold and RSS deploys (repeatable, e.g."
                         " --arg=--level --arg=1)")
    ap.add_argument("--compare-arg", action="append", default=[], metavar="ARG",
                    help="an extra `deploy` argument for the cold comparison deploy (repeatable)")
    ap.add_argument("--compare-full", action="store_true",
                    help="the comparison deploy sends the whole image as one v1 package (--full)")
    ap.add_argument("--compare-sender", metavar="PATH",
                    help="the sender binary of the cold comparison deploy (default: --bin-dir's)")
    args = ap.parse_args()
    if args.compare_env is None:
        other = (args.compare_receiver or args.compare_sender or args.compare_full
                 or args.compare_arg)
        args.compare_env = [] if other else ["DEPLOY_STREAM_COLD=0"]
    compare_env = dict(kv.split("=", 1) for kv in args.compare_env)
    compare_label = ", ".join([f"`{kv}`" for kv in args.compare_env]
                              + ([f"`{' '.join(args.compare_arg)}`"] if args.compare_arg else [])
                              + ([f"receiver `{args.compare_receiver}`"] if args.compare_receiver else [])
                              + ([f"sender `{args.compare_sender}`"] if args.compare_sender else [])
                              + (["the whole image as a v1 package (`--full`)"] if args.compare_full else []))
    global BIN
    BIN = Path(args.bin_dir)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for b in ("deploy-sender", "deploy-receiver"):
        if not (BIN / b).exists():
            sys.exit(f"{BIN / b} missing: cargo build --release -p deploy-sender -p deploy-receiver")
    u = uuid.uuid4().hex[:8]
    base = build(f"ltxb-base-{u}:v1", "FROM scratch\nCOPY busybox /bin/busybox\nCOPY base /opt/base.bin\n",
                 {"base": args.base_mib * MIB})
    app = "FROM {}\nCOPY top /srv/top.bin\nCMD [\"/bin/busybox\",\"sleep\",\"3600\"]\n"
    v1 = build(f"ltxb-app-{u}:v1", app.format(base), {"top": args.top_mib * MIB})
    v2 = build(f"ltxb-app-{u}:v2", app.format(base), {"top": args.top_mib * MIB})
    cut = build(f"ltxb-cut-{u}:v1", "FROM scratch\nCOPY busybox /bin/busybox\nCOPY big /big.bin\n"
                "CMD [\"/bin/busybox\",\"sleep\",\"3600\"]\n", {"big": args.cut_mib * MIB})
    cold = build(f"ltxb-cold-{u}:v1", "FROM scratch\nCOPY busybox /bin/busybox\nCOPY a /a.bin\n"
                 "COPY b /b.bin\nHEALTHCHECK --interval=1s --timeout=2s CMD [\"/bin/busybox\",\"true\"]\n"
                 "CMD [\"/bin/busybox\",\"sleep\",\"3600\"]\n",
                 {"a": args.base_mib * MIB, "b": args.top_mib * MIB}, args.content)
    rss = build(f"ltxb-rss-{u}:v1", "FROM scratch\nCOPY busybox /bin/busybox\nCOPY r1 /r1\nCOPY r2 /r2\n"
                "COPY r3 /r3\nCOPY r4 /r4\nCMD [\"/bin/busybox\",\"sleep\",\"3600\"]\n",
                {f"r{i}": args.rss_mib * MIB // 4 for i in range(1, 5)}, args.content)
    images = [rss, cold, cut, v2, v1, base]
    hosts, services = [], []
    rows = []
    try:
        pkg = work / "sender"
        h1 = Host(1, work); hosts.append(h1)
        s1, p1 = receiver(h1, work, "h1"); services.append(s1)
        layered = {"DEPLOY_STREAM_COLD": "0"}
        m1, o1, w1 = deploy(v1, p1, "ltxb-app", pkg, extra_env=layered)
        m2, o2, w2 = deploy(v2, p1, "ltxb-app", pkg, extra_env=layered)
        top = o2["layers"][-1]["size"]
        rows.append(("redeploy after a top-layer-only change: wire bytes / (1.05 x top layer blob + 256 KiB)",
                     f"{w2} B / {int(1.05 * top + 256 * 1024)} B = {w2 / (1.05 * top + 256 * 1024):.3f}"
                     f" (top blob {top} B; {o2['summary']})", "<= 1"))
        m3, o3, w3 = deploy(v2, p1, "ltxb-app", pkg, extra_env=layered)
        rows.append(("the same image again: wire bytes", f"{w3} B ({w3 / MIB:.3f} MiB)", "< 1 MiB"))

        h2 = Host(2, work); hosts.append(h2)
        subprocess.run(f"docker save {base} | DOCKER_HOST={h2.docker_host} docker load -q",
                       shell=True, check=True, capture_output=True)
        s2, p2 = receiver(h2, work, "h2"); services.append(s2)
        m4, o4, w4 = deploy(v1, p2, "ltxb-app", pkg, extra_env=layered)
        rows.append(("second host sharing the base: sender CPU s vs the first host's",
                     f"{m4.cpu:.2f} s / {m1.cpu:.2f} s = {m4.cpu / m1.cpu:.3f} (sent {w4} B;"
                     f" {o4['summary']}; compressed now: {o4['prepare']['compressed_layers']})", "<= 0.2"))

        # The cut image's bottom layer (busybox) is host 1's already (same chain ID): the big
        # blob is the only one on the wire, after a few KiB of inventory and release requests.
        p1.cut_at = p1.sent + int(0.6 * args.cut_mib * MIB)
        m5, o5, w5 = deploy(cut, p1, "ltxb-cut", pkg, extra_env=layered)
        big = o5["layers"][-1]
        rows.append(("cut at 60 % of a 96 MiB incompressible layer: total sent / layer blob",
                     f"{w5} B / {big['size']} B = {w5 / big['size']:.3f} (fate {big['fate']},"
                     f" resumed from {big['resumed_from']} B, no rerun)", "<= 1.15"))

        # Cold deploys: each run a fresh host for us (and a fresh sender cache) and another for
        # Docker's own pipe, one after the other, so both see the same machine at the same time.
        # Each run also deploys in the comparison setting (by default DEPLOY_AWAIT_BLOBS=0: every
        # blob sent before the load is asked for) to a third fresh host, side by side.
        ratios, lines, serial_ratios, serial_lines = [], [], [], []
        whole_ratios, whole_lines = [], []
        for run in range(args.cold_runs):
            h3 = Host(30 + run, work); hosts.append(h3)
            h4 = Host(60 + run, work); hosts.append(h4)
            h6 = Host(90 + run, work); hosts.append(h6)
            s3, p3 = receiver(h3, work, f"h3r{run}"); services.append(s3)
            s6, p6 = receiver(h6, work, f"h6r{run}", args.compare_receiver); services.append(s6)
            m6, o6, w6 = deploy(cold, p3, "ltxb-cold", work / f"cold-sender-{run}", health="docker",
                                extra_args=args.arg)
            rec = o6["deployment"]
            ours = m6.wall - (stage(rec, "start") + stage(rec, "health")) / 1000
            healthy = time_to_healthy(h3, "ltxb-cold")
            floor = bench.run(f"docker save {cold} | DOCKER_HOST={h4.docker_host} docker load -q", shell=True)
            m7, o7, _ = deploy(cold, p6, "ltxb-cold", work / f"cold-serial-sender-{run}",
                               extra_env=compare_env, health="docker", sender=args.compare_sender,
                               full=args.compare_full, extra_args=args.compare_arg)
            rec7 = o7["deployment"]
            serial = m7.wall - (stage(rec7, "start") + stage(rec7, "health")) / 1000
            ratios.append(ours / floor.wall)
            serial_ratios.append(serial / floor.wall)
            whole_ratios.append(m6.wall / (floor.wall + healthy))
            whole_lines.append(f"{m6.wall:.2f} s / ({floor.wall:.2f} s + {healthy:.2f} s)"
                               f" = {m6.wall / (floor.wall + healthy):.2f}, the receiver's health stage"
                               f" {stage(rec, 'health')} ms")
            lines.append(f"{ours:.2f} s / {floor.wall:.2f} s = {ours / floor.wall:.2f}")
            serial_lines.append(f"{serial:.2f} s / {floor.wall:.2f} s = {serial / floor.wall:.2f}")
            print(f"cold run {run + 1}: {lines[-1]}; whole deploy {whole_lines[-1]}"
                  f" ({o6.get('mode', 'package')}, wire {w6} B,"
                  f" prepare {o6['prepare']['duration_ms']} ms,"
                  f" transfer+load {o6['transfer_duration_ms']} ms, receiver stages "
                  f"{[(s['stage'], s['duration_ms']) for s in rec.get('stages', [])]});"
                  f" compared ({compare_label}) {serial_lines[-1]} ({before_send(o7)},"
                  f" {o7.get('mode', 'package')}, receiver stages "
                  f"{[(s['stage'], s['duration_ms']) for s in rec7.get('stages', [])]})", file=sys.stderr)
            print(f"cold run {run + 1}: ours {blob_checks(p3)}; compared {blob_checks(p6)}", file=sys.stderr)
            for s_ in (s3, s6):
                s_.stop(); services.remove(s_)
            for h in (h3, h4, h6):
                h.stop(); hosts.remove(h)
        median = sorted(ratios)[len(ratios) // 2]
        rows.append((f"cold deploy ({o6.get('mode')}) to loaded / docker save \\| docker load into a cold engine (median of {len(ratios)})",
                     f"**{median:.2f}** ({'; '.join(lines)}; ours = wall minus the receiver's start and health stages)",
                     "<= 1.0"))
        whole_median = sorted(whole_ratios)[len(whole_ratios) // 2]
        rows.append((f"whole cold deploy with the image's Docker HEALTHCHECK (1 s interval) / (pipe + the container's"
                     f" start-to-healthy, from its engine) (median of {len(whole_ratios)})",
                     f"**{whole_median:.2f}** ({'; '.join(whole_lines)})", "<= 1.0"))
        serial_median = sorted(serial_ratios)[len(serial_ratios) // 2]
        rows.append((f"the same, compared: {compare_label} (median of {len(serial_ratios)})",
                     f"{serial_median:.2f} ({'; '.join(serial_lines)})", "(comparison)"))

        s1.stop(); services.remove(s1)
        h5 = Host(5, work); hosts.append(h5)
        s5, p5 = receiver(h5, work, "h5")
        m7, o7, w7 = deploy(rss, p5, "ltxb-rss", work / "rss-sender", extra_args=args.arg)
        r5 = s5.stop()
        rows.append((f"peak RSS moving {args.rss_mib} MiB (sender / receiver)",
                     f"{m7.rss_mib:.1f} MiB / {r5.rss_mib:.1f} MiB (wire {w7 / MIB:.1f} MiB)", "< 64 MiB"))
    finally:
        for s in services:
            try:
                s.stop()
            except Exception:  # noqa: BLE001
                pass
        for h in hosts:
            h.stop()
        for i in images:
            subprocess.run(["docker", "rmi", "-f", i], capture_output=True)
        ok = subprocess.run(["ip", "link", "show", "docker0"], capture_output=True).returncode == 0
        print(f"docker0 after the hosts stopped: {'present' if ok else 'MISSING'}", file=sys.stderr)
    print(f"| what | measured | target |\n|---|---|---|")
    for what, got, target in rows:
        print(f"| {what} | {got} | {target} |")


if __name__ == "__main__":
    main()
