#!/usr/bin/env python3
"""Fleet rollout bench: the real deploy-sender and deploy-receiver binaries, real cold target
hosts (extra Docker engines, each in its own network namespace, as ../shared/TEST-HOSTS.md
describes; started by bench/layers.py's Host), and the sender's uplink counted by a loopback TCP
proxy in front of each receiver (everything the sender wrote to that receiver: HTTP headers,
journal queries, inventory, release registration, blob bodies). One run, side by side:

  1. a single-host deploy of an image of --mib MiB (busybox plus incompressible data), to a cold
     host, with a cold layer cache: the reference wall time and the bytes a cold host lacks;
  2. a rollout of the same image to 4 and to 8 cold hosts (--canary 1 --batch 50%), each with a
     cold layer cache of its own, through `deploy --to A,B,...`, without and with `--preload`
     (the hosts after the canary receive and load the release while the canary is checked).

Needs root (network namespaces), Docker, GNU time, /bin/busybox.

    cargo build --release -p deploy-sender -p deploy-receiver
    sudo bench/rollout.py                          # 100 MiB, 4 and 8 hosts, --health none
    sudo bench/rollout.py --health docker          # gated on the image's HEALTHCHECK (1 s)
    sudo bench/rollout.py --bin-dir target/debug --fleets 4

Targets: 4-host rollout wall <= 1.5 x the single-host deploy; uplink <= 1.05 x
(hosts x bytes missing per host). See docs/PERFORMANCE.md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (run)
import layers  # noqa: E402  (Host, Proxy, receiver, build)
from layers import MIB, SECRET, Host, build  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def start_hosts(first, n, work):
    """`n` cold engines started at once (numbered from `first`), each with a receiver and a
    counting proxy; returns [(host, service, proxy)]."""
    hosts, errors = [None] * n, []

    def one(i):
        try:
            hosts[i] = Host(first + i, work)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [h for h in hosts if h is not None]
    if errors:
        for h in started:
            h.stop()
        raise errors[0]
    fleet = []
    try:
        for i, h in enumerate(started):
            service, proxy = receiver(h, work, f"r{first + i}")
            fleet.append((h, service, proxy))
    except Exception:
        stop_fleet(fleet)
        for h in started[len(fleet):]:
            h.stop()
        raise
    return fleet


def receiver(host, work, name):
    """A receiver for `host`'s engine behind a counting proxy; the receiver answers to the
    proxy's address (RECEIVER_AUTHORITIES), which is what the sender signs."""
    port = bench.free_port()
    proxy = layers.Proxy(port)
    pkg = work / f"{name}-receiver"
    shutil.rmtree(pkg, ignore_errors=True)
    pkg.mkdir(parents=True)
    env = dict(os.environ, RECEIVER_BIND=f"127.0.0.1:{port}", PACKAGE_DIR=str(pkg),
               DEPLOY_HMAC_SECRET=SECRET, ALLOWED_NETWORKS="127.0.0.0/8", RUST_LOG="warn",
               RECEIVER_AUTHORITIES=f"127.0.0.1:{proxy.port}", DOCKER_HOST=host.docker_host)
    service = bench.Service([str(layers.BIN / "deploy-receiver")], env, work / f"{name}-receiver.log")
    bench.wait_http(f"http://127.0.0.1:{port}/health")
    return service, proxy


def stop_fleet(fleet):
    for h, service, _ in fleet:
        try:
            service.stop()
        except Exception:  # noqa: BLE001
            pass
        h.stop()


def sender(argv, pkg_dir):
    env = dict(os.environ, PACKAGE_DIR=str(pkg_dir), DEPLOY_HMAC_SECRET=SECRET, RUST_LOG="warn")
    m = bench.run([str(layers.BIN / "deploy-sender")] + argv, env=env, check=False)
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=100, help="image data size (incompressible)")
    ap.add_argument("--fleets", default="4,8", help="rollout sizes, comma-separated")
    ap.add_argument("--health", choices=["none", "docker"], default="none",
                    help="none: --health none (the 3 s settle gate); docker: the image gets a"
                         " HEALTHCHECK with a 1 s interval and hosts are gated on it")
    ap.add_argument("--preload", choices=["both", "off", "on"], default="both",
                    help="rollouts without --preload, with it, or both side by side (default)")
    ap.add_argument("--work", default=str(REPO / "target/bench-rollout"))
    ap.add_argument("--bin-dir", default=str(REPO / "target/release"),
                    help="where deploy-sender and deploy-receiver are (default target/release)")
    args = ap.parse_args()
    layers.BIN = Path(args.bin_dir)
    for b in ("deploy-sender", "deploy-receiver"):
        if not (layers.BIN / b).exists():
            sys.exit(f"{layers.BIN / b} missing: cargo build --release -p deploy-sender -p deploy-receiver")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fleets = [int(n) for n in args.fleets.split(",") if n]
    u = uuid.uuid4().hex[:8]
    healthcheck = ("HEALTHCHECK --interval=1s --timeout=2s CMD [\"/bin/busybox\",\"true\"]\n"
                   if args.health == "docker" else "")
    image = build(f"rollb-{u}:v1", "FROM scratch\nCOPY busybox /bin/busybox\nCOPY data /data.bin\n"
                  + healthcheck + "CMD [\"/bin/busybox\",\"sleep\",\"3600\"]\n", {"data": args.mib * MIB})
    name = f"rollb-{u}"
    common = ["deploy", "--image", image, "--name", name, "--health", args.health, "--json"]
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.preload]
    rows = []
    try:
        # 1. One cold host, cold layer cache.
        fleet = start_hosts(0, 1, work)
        try:
            proxy = fleet[0][2]
            m = sender(common + ["--to", proxy.url], work / "single-sender")
            if m.rc != 0:
                raise RuntimeError(f"single deploy failed: {m.err[-2000:]}{m.out[-2000:]}")
            outcome = json.loads(m.out)
            single_wall, single_wire = m.wall, proxy.sent
        finally:
            stop_fleet(fleet)
        totals = outcome["totals"]
        missing = totals["bytes_total"] - totals["bytes_already_there"]
        rows.append(("single-host deploy (reference)",
                     f"{single_wall:.2f} s; uplink {single_wire} B; missing on the host {missing} B"
                     f" ({outcome['summary']}; sender CPU {m.cpu:.2f} s)", ""))

        # 2. Rollouts to cold fleets, each with a cold layer cache.
        first = 1
        for n, preload in [(n, p) for n in fleets for p in modes]:
            fleet = start_hosts(first, n, work)
            first += n
            flag = ["--preload"] if preload else []
            label = f"{n}-host rollout{' --preload' if preload else ''}"
            try:
                to = ",".join(p.url for _, _, p in fleet)
                m = sender(common + ["--to", to, "--canary", "1", "--batch", "50%"] + flag,
                           work / f"fleet{n}{'p' if preload else ''}-sender")
                wire = sum(p.sent for _, _, p in fleet)
            finally:
                stop_fleet(fleet)
            if m.rc != 0:
                raise RuntimeError(f"{label} ended with {m.rc}: {m.err[-3000:]}{m.out[-3000:]}")
            report = json.loads(m.out)
            reported = sum(h["bytes"] for h in report["hosts"])
            steps = {}
            for h in report["hosts"]:
                phase = h["phase"] if isinstance(h["phase"], str) else json.dumps(h["phase"])
                pre = f" (preload {h['preload_ms'] / 1000:.1f})" if h.get("preload_ms") is not None else ""
                steps.setdefault(phase, []).append(f"{h['deploy_ms'] / 1000:.1f}{pre}")
            per_step = "; ".join(f"{p}: " + ", ".join(v) + " s" for p, v in steps.items())
            ratio = m.wall / single_wall
            rows.append((f"{label} (canary 1, batch 50 %, {report['steps_planned']} steps):"
                         " wall / single-host deploy",
                         f"{m.wall:.2f} s / {single_wall:.2f} s = **{ratio:.2f}** (per host deploy:"
                         f" {per_step}; sender CPU {m.cpu:.2f} s)",
                         "<= 1.5" if n == 4 else "-"))
            rows.append((f"{label}: uplink / ({n} x missing per host)",
                         f"{wire} B / {n * missing} B = **{wire / (n * missing):.4f}** (blob bytes in"
                         f" the report: {reported} B = {reported / (n * missing):.4f})", "<= 1.05"))
    finally:
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True)
        ok = subprocess.run(["ip", "link", "show", "docker0"], capture_output=True).returncode == 0
        print(f"docker0 after the hosts stopped: {'present' if ok else 'MISSING'}", file=sys.stderr)
    print("| what | measured | target |\n|---|---|---|")
    for what, got, target in rows:
        print(f"| {what} | {got} | {target} |")


if __name__ == "__main__":
    main()
