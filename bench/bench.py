#!/usr/bin/env python3
"""End-to-end performance bench: the docker save|load floor, the naive
save|gzip|curl way, and deploy-sender -> deploy-receiver with the real binaries, on one host's
Docker Engine. Standard library only; needs Docker, curl, gzip, GNU time (/usr/bin/time) and Debian's busybox-static.

    bench/bench.py --quick      # 100 MiB images, 1 run each, short bursts: a few minutes
    bench/bench.py              # 100 MiB and 1 GiB images, median of 3 alternating runs

Every figure it prints comes from the processes it starts: wall time from the bench, peak RSS
and CPU of each short-lived command from GNU time (/usr/bin/time), of a long-running service
from its /proc VmHWM and wait4() (it is started fresh for each measurement, so its totals
cover exactly that run), and the engine's CPU from
/proc/<dockerd>/stat and /proc/<containerd>/stat before and after. See docs/PERFORMANCE.md.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from signing import signature_headers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
IMAGE_VERSION = "1"  # bump when the test images' recipe changes
BUSYBOX = Path("/bin/busybox")
SECRET = b"deploy-bench-secret-0123456789abcdef"
KEY_ID = "default"
E2E_CONTAINER = "deploy-bench-e2e"
BURST_CONTAINER = "deploy-bench-burst"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ONE_SHOT = False  # --burst-one-shot

# ---------------------------------------------------------------------------------------------
# Measuring processes


class Measured:
    """A finished process: wall seconds, peak RSS (KiB, the largest single process of the tree
    that was waited for), CPU seconds (user+sys of the process and its waited-for children)."""

    def __init__(self, wall, rc, maxrss_kib, cpu, out="", err=""):
        self.wall, self.rc, self.maxrss_kib, self.cpu, self.out, self.err = \
            wall, rc, maxrss_kib, cpu, out, err

    @property
    def rss_mib(self):
        return self.maxrss_kib / 1024


def run(argv, env=None, check=True, stdin_path=None, shell=False):
    """Runs a command to completion; stdout/stderr go to temp files (never a pipe that could
    fill), rusage comes from wait4()."""
    command = ["/bin/bash", "-c", argv] if shell else [str(a) for a in argv]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(mode="r") as timing:
        # Peak RSS through GNU time: Linux carries a process's ru_maxrss across exec, and Python
        # spawns with vfork, so wait4() here would report at least this bench's own RSS.
        timed = ["/usr/bin/time", "-f", "%M %U %S", "-o", timing.name] + command
        stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
        started = time.perf_counter()
        proc = subprocess.Popen(timed, stdin=stdin, stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if stdin_path:
            stdin.close()
        out.seek(0)
        err.seek(0)
        fields = (timing.read().strip().splitlines() or ["0 0 0"])[-1].split()
        try:
            maxrss, cpu = int(fields[0]), float(fields[1]) + float(fields[2])
        except (ValueError, IndexError):
            maxrss, cpu = 0, ru.ru_utime + ru.ru_stime
        m = Measured(wall, proc.returncode, maxrss, cpu,
                     out.read().decode(errors="replace"), err.read().decode(errors="replace"))
    if check and m.rc != 0:
        cmd = argv if isinstance(argv, str) else " ".join(map(str, argv))
        raise RuntimeError(f"command failed ({m.rc}): {cmd}\n{m.err[-2000:]}{m.out[-2000:]}")
    return m


def sh(cmd, check=True):
    return run(cmd, shell=True, check=check)


class Service:
    """A long-running process started fresh for one measurement; stop() returns its totals."""

    def __init__(self, argv, env, log_path):
        self.log = open(log_path, "ab")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL)

    def vm(self, field):
        """A /proc/<pid>/status field in KiB (VmRSS, VmHWM), or 0."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def stop(self):
        hwm = self.vm("VmHWM")
        try:
            self.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.time() + 15
        while time.time() < deadline:
            pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)
        else:
            self.proc.kill()
            pid, status, ru = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.log.close()
        # VmHWM is of the process's own address space since exec (ru_maxrss is not: see run()).
        return Measured(time.perf_counter() - self.started, self.proc.returncode,
                        hwm, ru.ru_utime + ru.ru_stime)


def engine_pids():
    pids = []
    for name in ("dockerd", "containerd"):
        r = run(["pidof", name], check=False)
        pids += [int(p) for p in r.out.split()]
    return pids


ENGINE_PIDS = []


def engine_cpu():
    """CPU seconds used so far by dockerd and containerd (and their waited-for children, such as
    docker-untar), or None when /proc does not show them."""
    total = 0
    try:
        for pid in ENGINE_PIDS:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    except (OSError, IndexError, ValueError):
        return None
    return total / CLK_TCK if ENGINE_PIDS else None


class EngineMeter:
    def __enter__(self):
        self.start = engine_cpu()
        return self

    def __exit__(self, *_):
        end = engine_cpu()
        self.cpu = None if self.start is None or end is None else end - self.start


class LargestFile:
    """Samples the largest file under some directories while a run goes on (every 50 ms)."""

    def __init__(self, *dirs):
        self.dirs, self.largest, self.name = dirs, 0, ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            for d in self.dirs:
                for root, _, files in os.walk(d):
                    for f in files:
                        try:
                            size = os.stat(os.path.join(root, f)).st_size
                        except OSError:
                            continue
                        if size > self.largest:
                            self.largest, self.name = size, f
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


# ---------------------------------------------------------------------------------------------
# Test images, built FROM scratch (never pulled)


def image_exists(ref):
    r = run(["docker", "image", "inspect", "-f", "{{index .Config.Labels \"deploy-bench\"}}", ref],
            check=False)
    return r.rc == 0 and r.out.strip() == IMAGE_VERSION


def usr_files():
    """Regular files under /usr in a stable order."""
    for root, dirs, files in os.walk("/usr"):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(root, f)
            if os.path.isfile(path) and not os.path.islink(path) and os.access(path, os.R_OK):
                yield path


def write_layers(ctx, kind, size, layers, marker):
    """Layer tars in ctx: `usr` takes files of /usr in order up to `size` bytes; `random` is one
    file of os.urandom bytes. The first layer also holds busybox, a web root and a marker unique
    to the image, so no two bench images share a layer."""
    names = []
    per_layer = size // layers
    files = usr_files()
    for i in range(layers):
        name = f"layer{i}.tar"
        names.append(name)
        with tarfile.open(ctx / name, "w", format=tarfile.PAX_FORMAT) as tar:
            if i == 0:
                tar.add(BUSYBOX, "bin/busybox")
                (ctx / "marker").write_text(marker)
                tar.add(ctx / "marker", "www/index.html")
            if kind == "random":
                data = ctx / "random.bin"
                with open(data, "wb") as f:
                    for _ in range(per_layer // MIB):
                        f.write(os.urandom(MIB))
                tar.add(data, "data/random.bin")
                data.unlink()
                continue
            added = 0
            for path in files:
                tar.add(path, "data" + path, recursive=False)
                added += os.path.getsize(path)
                if added >= per_layer:
                    break
            else:
                raise RuntimeError("/usr holds less than the image size asked for")
    return names


DOCKERFILE_TAIL = """\
LABEL deploy-bench={version}
HEALTHCHECK --interval=250ms --timeout=2s --retries=3 \\
  CMD ["/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:80/"]
CMD ["/bin/busybox", "sh", "-c", "trap 'exit 0' TERM; /bin/busybox httpd -f -p 80 -h /www & wait"]
"""


def build_image(ref, kind, size, work, extra_files=None):
    if image_exists(ref):
        return
    ctx = Path(tempfile.mkdtemp(prefix="ctx-", dir=work))
    try:
        layers = max(1, size // (256 * MIB)) if kind == "usr" else 1
        names = write_layers(ctx, kind, size, layers, f"{ref} {uuid.uuid4()}\n") if size else []
        lines = ["FROM scratch"] + [f"ADD {n} /" for n in names]
        if not size:  # tiny: busybox and a page
            shutil.copy(BUSYBOX, ctx / "busybox")
            (ctx / "index.html").write_text(extra_files or ref)
            lines += ["COPY busybox /bin/busybox", "COPY index.html /www/index.html"]
        (ctx / "Dockerfile").write_text("\n".join(lines) + "\n" +
                                        DOCKERFILE_TAIL.format(version=IMAGE_VERSION))
        print(f"  building {ref} ({kind}, {size // MIB} MiB)", flush=True)
        run(["docker", "build", "-q", "-t", ref, str(ctx)])
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


def save_size(ref):
    """Bytes of `docker save ref` (the image bytes every MB/s figure is of)."""
    r = sh(f"docker save {ref} | wc -c")
    return int(r.out.strip())


def remove_bench_containers():
    r = run(["docker", "ps", "-aq", "--filter", "name=deploy-bench"], check=False)
    ids = r.out.split()
    if ids:
        run(["docker", "rm", "-f", *ids], check=False)


def rmi(ref):
    remove_bench_containers()
    run(["docker", "rmi", "-f", ref])


def assert_image(ref):
    if run(["docker", "image", "inspect", ref], check=False).rc != 0:
        raise RuntimeError(f"{ref} is missing from the engine: a previous run did not load it back")


# ---------------------------------------------------------------------------------------------
# The three ways


def floor(ref, work):
    """docker save to a file, docker rmi, docker load from the file: each timed on its own."""
    assert_image(ref)
    remove_bench_containers()
    archive = work / "floor.tar"
    with EngineMeter() as es:
        save = run(["docker", "save", "-o", str(archive), ref])
    rmi(ref)
    with EngineMeter() as el:
        load = run(["docker", "load", "-i", str(archive)])
    archive.unlink()
    assert_image(ref)
    return {"save_s": save.wall, "load_s": load.wall, "seconds": save.wall + load.wall,
            "overlap_bound_s": max(save.wall, load.wall),
            "sender_rss_mib": save.rss_mib, "sender_cpu_s": save.cpu,
            "receiver_rss_mib": load.rss_mib, "receiver_cpu_s": load.cpu,
            "engine_cpu_s": add(es.cpu, el.cpu), "ratio": 1.0}


def add(*xs):
    return None if any(x is None for x in xs) else sum(xs)


NAIVE_RECEIVER = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        left = int(self.headers["Content-Length"])
        with open(sys.argv[2], "wb") as f:
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                f.write(chunk)
                left -= len(chunk)
        self.send_response(200 if not left else 400)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def naive(ref, work):
    """docker save | gzip | curl --data-binary @- into a plain Python upload server, docker rmi,
    then gunzip | docker load."""
    assert_image(ref)
    remove_bench_containers()
    port = free_port()
    upload = work / "naive-upload.tar.gz"
    server = Service([sys.executable, "-c", NAIVE_RECEIVER, str(port), str(upload)],
                     None, work / "naive-receiver.log")
    try:
        time.sleep(0.3)
        with EngineMeter() as es:
            send = sh(f"set -o pipefail; docker save {ref} | gzip | curl -sS --fail "
                      f"-H 'Content-Type: application/octet-stream' "
                      f"--data-binary @- http://127.0.0.1:{port}/upload")
    finally:
        received = server.stop()
    package_size = upload.stat().st_size
    rmi(ref)
    with EngineMeter() as el:
        load = sh(f"set -o pipefail; gunzip < {upload} | docker load")
    upload.unlink()
    assert_image(ref)
    return {"upload_s": send.wall, "load_s": load.wall, "seconds": send.wall + load.wall,
            "package_size": package_size,
            "sender_rss_mib": send.rss_mib, "sender_cpu_s": send.cpu,
            "receiver_rss_mib": max(received.rss_mib, load.rss_mib),
            "receiver_cpu_s": received.cpu + load.cpu, "engine_cpu_s": add(es.cpu, el.cpu)}


class Bins:
    sender = REPO / "target/release/deploy-sender"
    receiver = REPO / "target/release/deploy-receiver"


def start_receiver(work, name, extra_env=None):
    port = free_port()
    pkg = work / f"{name}-receiver"
    shutil.rmtree(pkg, ignore_errors=True)
    pkg.mkdir(parents=True)
    env = dict(os.environ, RECEIVER_BIND=f"127.0.0.1:{port}", PACKAGE_DIR=str(pkg),
               DEPLOY_HMAC_SECRET=SECRET.decode(), DEPLOY_HMAC_KEY_ID=KEY_ID,
               ALLOWED_NETWORKS="127.0.0.0/8", RUST_LOG="warn", **(extra_env or {}))
    service = Service([str(Bins.receiver)], env, work / f"{name}-receiver.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    return service, url, pkg


def sender_env(pkg_dir):
    return dict(os.environ, PACKAGE_DIR=str(pkg_dir), DEPLOY_HMAC_SECRET=SECRET.decode(),
                DEPLOY_HMAC_KEY_ID=KEY_ID, RUST_LOG="warn")


def signed_post(url, path, body):
    data = json.dumps(body, separators=(",", ":")).encode()
    authority = urllib.parse.urlsplit(url).netloc
    headers = signature_headers(SECRET, KEY_ID, authority, "POST", path, data)
    headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST")
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=900) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {path}: {e.code} {e.read()[:500]!r}") from None
    return answer, time.perf_counter() - started


def deploy_spec(container, image, package_id):
    return {"deployment": {"container_name": container, "image": image,
                           "health_check": {"kind": "docker", "interval_secs": 0.1,
                                            "deadline_secs": 60.0}},
            "package_id": package_id}


def stage_ms(record, stage):
    return sum(s["duration_ms"] for s in record.get("stages", []) if s["stage"] == stage)


def ours(ref, work, compression):
    """deploy-sender package -> docker rmi -> deploy-sender transfer -> POST /deployment/load ->
    POST /deployment/deploy (health check: the image's HEALTHCHECK), against a fresh receiver."""
    assert_image(ref)
    remove_bench_containers()
    sender_pkg = work / "sender-packages"
    shutil.rmtree(sender_pkg, ignore_errors=True)
    sender_pkg.mkdir()
    receiver, url, receiver_pkg = start_receiver(work, "e2e")
    env = sender_env(sender_pkg)
    try:
        with LargestFile(sender_pkg, receiver_pkg) as largest:
            with EngineMeter() as e1:
                package = run([Bins.sender, "package", "--image", ref, "--compression",
                               compression, "--json"], env=env)
            info = json.loads(package.out)
            rmi(ref)
            transfer = run([Bins.sender, "transfer", "--stored", info["package_id"],
                            "--package-dir", sender_pkg, "--to", url, "--json"], env=env)
            uploaded = json.loads(transfer.out)
            with EngineMeter() as e2:
                loaded, load_s = signed_post(url, "/deployment/load",
                                             {"package_id": info["package_id"]})
                record, deploy_s = signed_post(url, "/deployment/deploy",
                                               deploy_spec(E2E_CONTAINER, ref, info["package_id"]))
        if record.get("status") != "SUCCEEDED":
            raise RuntimeError(f"deployment did not succeed: {record}")
    finally:
        served = receiver.stop()
    assert_image(ref)
    remove_bench_containers()
    shutil.rmtree(sender_pkg, ignore_errors=True)
    shutil.rmtree(receiver_pkg, ignore_errors=True)
    to_loaded = package.wall + transfer.wall + load_s
    return {"package_s": package.wall, "export_ms": info["export_duration_ms"],
            "transfer_s": transfer.wall, "upload_ms": uploaded["duration_ms"],
            "upload_mbps": info["package_size"] / 1e6 / (uploaded["duration_ms"] / 1e3),
            "load_s": load_s, "load_ms": loaded["duration_ms"], "deploy_s": deploy_s,
            "start_ms": stage_ms(record, "start"), "health_ms": stage_ms(record, "health"),
            "seconds": to_loaded, "healthy_s": to_loaded + deploy_s,
            "package_size": info["package_size"], "original_size": info["original_size"],
            "largest_file": largest.largest,
            "sender_rss_mib": max(package.rss_mib, transfer.rss_mib),
            "sender_cpu_s": package.cpu + transfer.cpu,
            "receiver_rss_mib": served.rss_mib, "receiver_cpu_s": served.cpu,
            "engine_cpu_s": add(e1.cpu, e2.cpu)}


# ---------------------------------------------------------------------------------------------
# Concurrency, bursts, Kafka


def concurrent_round(work, package, n, size, max_uploads):
    """n simultaneous `deploy-sender transfer --file` of one package file (each its own id) to a
    fresh receiver. The upload window is from the earliest receiver-side start to the last end:
    the sender's pre-hash of the file (manifest_for_file) is outside it."""
    receiver, url, pkg = start_receiver(work, f"conc{n}",
                                        {"MAX_CONCURRENT_UPLOADS": str(max_uploads)})
    env = sender_env(work / "conc-sender")
    results = [None] * n

    def one(i):
        try:
            m = run([Bins.sender, "transfer", "--file", package, "--compression", "none",
                     "--package-id", str(uuid.uuid4()), "--to", url, "--json"], env=env,
                    check=False)
            results[i] = (m, time.perf_counter())
        except Exception as e:  # noqa: BLE001  reported below
            results[i] = (e, time.perf_counter())

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    served = receiver.stop()
    shutil.rmtree(pkg, ignore_errors=True)
    windows, failures = [], []
    for m, ended in results:
        if isinstance(m, Exception) or m.rc != 0:
            failures.append(str(m) if isinstance(m, Exception) else (m.err or m.out).strip()[-300:])
            continue
        duration = json.loads(m.out)["duration_ms"] / 1e3
        windows.append((ended - duration, ended))
    ok = len(windows)
    window = (max(e for _, e in windows) - min(s for s, _ in windows)) if windows else None
    return {"n": n, "ok": ok, "failures": failures, "wall_s": wall,
            "upload_window_s": window,
            "aggregate_mbps": ok * size / 1e6 / window if window else 0.0,
            "wall_mbps": ok * size / 1e6 / wall,
            "receiver_rss_mib": served.rss_mib, "receiver_cpu_s": served.cpu}


def disk_floor(work, package):
    """What the receiver's disk allows: copy the package file (in the page cache) to a new file in
    the receiver's directory in 1 MiB writes, fsync, rename, as the receiver stores a package."""
    target = work / "disk-floor.tmp"
    started = time.perf_counter()
    with open(package, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(MIB):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.rename(target, work / "disk-floor.bin")
    seconds = time.perf_counter() - started
    size = (work / "disk-floor.bin").stat().st_size
    (work / "disk-floor.bin").unlink()
    return {"seconds": seconds, "mbps": size / 1e6 / seconds}


def burst(work, count):
    """`count` deploys in a row of tiny images (a new version each time, each a new package):
    package -> transfer -> load -> deploy (health check: the image's HEALTHCHECK), one
    receiver for the whole burst."""
    tags = [f"deploy-bench-tiny:v{i}" for i in range(count)]
    for i, tag in enumerate(tags):
        build_image(tag, "tiny", 0, work, extra_files=f"version {i} {uuid.uuid4()}\n")
    remove_bench_containers()
    receiver, url, pkg = start_receiver(work, "burst")
    sender_pkg = work / "burst-sender"
    shutil.rmtree(sender_pkg, ignore_errors=True)
    env = sender_env(sender_pkg)
    per_deploy, sender_rss, sender_cpu = [], 0.0, 0.0
    # One `deploy-sender deploy --image` per deploy (package + /deployment/full) where the CLI
    # has it, else the stages one by one.
    one_shot = ONE_SHOT and run([Bins.sender, "deploy", "--help"], check=False).rc == 0
    rss_after_first = None
    started = time.perf_counter()
    try:
        for i, tag in enumerate(tags):
            t0 = time.perf_counter()
            if one_shot:
                d = run([Bins.sender, "deploy", "--image", tag, "--name", BURST_CONTAINER,
                         "--health", "docker", "--to", url, "--json"], env=env)
                steps = [d]
            else:
                p = run([Bins.sender, "package", "--image", tag, "--json"], env=env)
                info = json.loads(p.out)
                t = run([Bins.sender, "transfer", "--stored", info["package_id"], "--to", url,
                         "--json"], env=env)
                signed_post(url, "/deployment/load", {"package_id": info["package_id"]})
                record, _ = signed_post(url, "/deployment/deploy",
                                        deploy_spec(BURST_CONTAINER, tag, info["package_id"]))
                if record.get("status") != "SUCCEEDED":
                    raise RuntimeError(f"deploy {i} did not succeed: {record}")
                steps = [p, t]
            per_deploy.append(time.perf_counter() - t0)
            sender_rss = max([sender_rss] + [m.rss_mib for m in steps])
            sender_cpu += sum(m.cpu for m in steps)
            if i == 0:
                rss_after_first = receiver.vm("VmRSS") / 1024
        total = time.perf_counter() - started
        rss_end = receiver.vm("VmRSS") / 1024
    finally:
        served = receiver.stop()
        remove_bench_containers()
        shutil.rmtree(sender_pkg, ignore_errors=True)
        shutil.rmtree(pkg, ignore_errors=True)
        for tag in tags:
            run(["docker", "rmi", "-f", tag], check=False)
    return {"count": count, "one_shot": one_shot, "total_s": total, "per_hour": count * 3600 / total,
            "median_s": statistics.median(per_deploy), "max_s": max(per_deploy),
            "sender_rss_mib": sender_rss, "sender_cpu_s": sender_cpu,
            "receiver_rss_mib": served.rss_mib, "receiver_cpu_s": served.cpu,
            "receiver_rss_after_first_mib": rss_after_first, "receiver_rss_end_mib": rss_end}


def kafka():
    r = run(["cargo", "bench", "-q", "-p", "deploy-events", "--bench", "publish_latency"],
            check=False)
    lines = [line for line in r.out.splitlines() if line.strip()]
    return {"rc": r.rc, "lines": lines, "stderr_tail": r.err.strip().splitlines()[-5:]}


# ---------------------------------------------------------------------------------------------
# Report


def med(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def report(results, machine, args):
    out = []
    p = out.append
    p(f"Machine: {machine}")
    p(f"Command: {' '.join(['bench/bench.py'] + sys.argv[1:])}; runs per configuration: {args.runs}"
      " (alternating; medians shown)")
    for image in results["images"]:
        ref, size = image["ref"], image["save_bytes"]
        floor_s = med(image["floor"], "seconds")
        p("")
        p(f"### {ref}: docker save archive {size / 1e6:.1f} MB")
        p("")
        p("| way | seconds | image MB/s | x floor | compressed ratio | sender peak RSS MiB | "
          "sender CPU s | receiver peak RSS MiB | receiver CPU s | engine CPU s |")
        p("|---|---|---|---|---|---|---|---|---|---|")
        for label, key in (("floor: docker save, then docker load", "floor"),
                           ("naive: save\\|gzip\\|curl, gunzip\\|load", "naive"),
                           ("deploy, gzip (level 1)", "gzip"), ("deploy, zstd (level 3)", "zstd")):
            runs = image[key]
            secs = med(runs, "seconds")
            pkg = med(runs, "package_size")
            p(f"| {label} | {fmt(secs)} | {fmt(size / 1e6 / secs, '.0f')} | "
              f"{fmt(secs / floor_s)} | {fmt(size / pkg if pkg else 1.0)} | "
              f"{fmt(med(runs, 'sender_rss_mib'), '.1f')} | {fmt(med(runs, 'sender_cpu_s'))} | "
              f"{fmt(med(runs, 'receiver_rss_mib'), '.1f')} | {fmt(med(runs, 'receiver_cpu_s'))} | "
              f"{fmt(med(runs, 'engine_cpu_s'))} |")
        f = image["floor"]
        p("")
        p(f"Floor stages: save {fmt(med(f, 'save_s'))} s, load {fmt(med(f, 'load_s'))} s "
          f"(a perfect save|load pipe could not beat max = {fmt(med(f, 'overlap_bound_s'))} s). "
          f"Naive stages: save|gzip|curl {fmt(med(image['naive'], 'upload_s'))} s, "
          f"gunzip|load {fmt(med(image['naive'], 'load_s'))} s.")
        p("")
        p("| deploy stages | package (export+compress+hash+fsync) s | transfer (CLI) s | "
          "upload (receiver) s | upload MB/s of package bytes | load s | to loaded s | "
          "start + health s | to healthy s | largest file seen / package |")
        p("|---|---|---|---|---|---|---|---|---|---|")
        for key in ("gzip", "zstd"):
            runs = image[key]
            ratio = med([{"x": r["largest_file"] / r["package_size"]} for r in runs], "x")
            p(f"| {key} | {fmt(med(runs, 'package_s'))} | {fmt(med(runs, 'transfer_s'))} | "
              f"{fmt(med(runs, 'upload_ms') / 1e3)} | {fmt(med(runs, 'upload_mbps'), '.0f')} | "
              f"{fmt(med(runs, 'load_s'))} | {fmt(med(runs, 'seconds'))} | "
              f"{fmt(med(runs, 'deploy_s'))} | {fmt(med(runs, 'healthy_s'))} | {fmt(ratio)} |")
    if results.get("concurrent"):
        c = results["concurrent"]
        p("")
        p(f"### Concurrent transfers: {c['size'] / MIB:.0f} MiB package (compression none), "
          f"MAX_CONCURRENT_UPLOADS={c['max_uploads']}")
        p("")
        p("| receiver | transfers at once | succeeded | upload window s | aggregate MB/s (receiver side) | "
          "aggregate MB/s (wall, incl. CLI start and pre-hash) | receiver peak RSS MiB |")
        p("|---|---|---|---|---|---|---|")
        receivers = sorted({r["receiver"] for r in c["rounds"]}, key=lambda b: b != str(Bins.receiver))
        for binary in receivers:
            for n in sorted({r["n"] for r in c["rounds"]}):
                rs = [r for r in c["rounds"] if r["n"] == n and r["receiver"] == binary]
                p(f"| {Path(binary).name} | {n} | {min(r['ok'] for r in rs)}/{n} | "
                  f"{fmt(med(rs, 'upload_window_s'))} | "
                  f"{fmt(med(rs, 'aggregate_mbps'), '.0f')} | {fmt(med(rs, 'wall_mbps'), '.0f')} | "
                  f"{fmt(med(rs, 'receiver_rss_mib'), '.1f')} |")
        main_rounds = [r for r in c["rounds"] if r["receiver"] == str(Bins.receiver)]
        one = med([r for r in main_rounds if r["n"] == 1], "aggregate_mbps")
        five = med([r for r in main_rounds if r["n"] == c["n"]], "aggregate_mbps")
        disk = med(c["disk"], "mbps")
        p("")
        p(f"{c['n']} at once / one alone (aggregate, receiver side): {fmt(five / one if one else None)}. "
          f"Disk floor, the same bytes copied from the page cache to a new file, fsynced and renamed "
          f"as the receiver stores a package: {fmt(disk, '.0f')} MB/s (one upload alone reaches "
          f"{fmt(one / disk if one and disk else None)} of it).")
        fails = [f for r in c["rounds"] for f in r["failures"]]
        if fails:
            p(f"Failures: {fails[:3]}")
    if results.get("burst"):
        b = results["burst"]
        p("")
        how = ("`deploy-sender deploy --image TAG --health docker` each" if b.get("one_shot")
               else "package, transfer, load, deploy each")
        p(f"### Burst: {b['count']} deploys of a tiny image (new version and package each time; {how})")
        p("")
        p(f"{b['count']} deploys in {b['total_s']:.1f} s: **{b['per_hour']:.0f} deploys/hour** "
          f"(median {b['median_s']:.2f} s, slowest {b['max_s']:.2f} s per deploy). Sender peak RSS "
          f"{b['sender_rss_mib']:.1f} MiB; receiver peak RSS {b['receiver_rss_mib']:.1f} MiB, RSS "
          f"after the first deploy {fmt(b['receiver_rss_after_first_mib'], '.1f')} MiB, after the "
          f"last {fmt(b['receiver_rss_end_mib'], '.1f')} MiB; receiver CPU {b['receiver_cpu_s']:.2f} s.")
    if results.get("kafka"):
        k = results["kafka"]
        p("")
        p("### Kafka publish latency (`cargo bench -p deploy-events`, librdkafka mock cluster on loopback)")
        p("")
        p("```")
        out.extend(k["lines"] or ["(no output; exit %s) %s" % (k["rc"], k["stderr_tail"])])
        p("```")
    return "\n".join(out)


def machine_summary():
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    docker = run(["docker", "version", "-f", "{{.Server.Version}}"], check=False).out.strip()
    driver = run(["docker", "info", "-f", "{{.Driver}}"], check=False).out.strip()
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{os.cpu_count()} CPUs ({cpu}), {int(mem) / 1024 / 1024:.1f} GiB RAM, "
            f"kernel {platform.release()}, Docker Engine {docker} ({driver})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 run, 100 MiB images only, 5-transfer round once, 20 small deploys")
    ap.add_argument("--runs", type=int, help="runs per configuration (default 3; --quick 1)")
    ap.add_argument("--sizes", default=None, help="usr image sizes in MiB (default 100,1024; --quick 100)")
    ap.add_argument("--only", default="e2e,concurrent,burst,kafka",
                    help="comma-separated parts: e2e, concurrent, burst, kafka")
    ap.add_argument("--burst", type=int, help="small deploys in the burst (default 100; --quick 20)")
    ap.add_argument("--concurrent", type=int, default=5, help="transfers at once (default 5)")
    ap.add_argument("--concurrent-mib", type=int, default=200, help="package size for it (MiB)")
    ap.add_argument("--max-uploads", type=int, default=None,
                    help="receiver MAX_CONCURRENT_UPLOADS for the concurrency part "
                         "(default: the --concurrent count, so none is refused BUSY)")
    ap.add_argument("--receiver", help="the deploy-receiver binary (default target/release's; "
                    "with --no-build, e.g. a saved copy or a wrapper script that sets the environment)")
    ap.add_argument("--ab-receiver", help="another deploy-receiver binary to alternate with "
                    "--receiver in the concurrency part (before/after a change)")
    ap.add_argument("--burst-one-shot", action="store_true",
                    help="burst: one `deploy-sender deploy --image` per deploy instead of the stages")
    ap.add_argument("--work", default=str(REPO / "target/bench"), help="scratch directory")
    ap.add_argument("--no-build", action="store_true", help="use target/release binaries as they are")
    ap.add_argument("--json", help="also write all raw results to this file")
    ap.add_argument("--markdown", help="also write the report to this file")
    args = ap.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    sizes = [int(s) for s in (args.sizes or ("100" if args.quick else "100,1024")).split(",")]
    args.burst = args.burst or (20 if args.quick else 100)
    parts = set(args.only.split(","))
    global ONE_SHOT
    ONE_SHOT = args.burst_one_shot
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.receiver:
        Bins.receiver = Path(args.receiver).resolve()

    for tool in ("docker", "curl", "gzip", "gunzip", "/usr/bin/time"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is required")
    if not BUSYBOX.exists():
        sys.exit("bench: /bin/busybox is required (Debian: apt-get install busybox-static)")
    if not args.no_build:
        print("==> cargo build --release -p deploy-sender -p deploy-receiver", flush=True)
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "deploy-sender", "-p",
                        "deploy-receiver"], cwd=REPO, check=True)
    ENGINE_PIDS.extend(engine_pids())
    machine = machine_summary()
    print("==> " + machine, flush=True)
    results = {"machine": machine, "argv": sys.argv, "runs": args.runs, "images": []}

    if "e2e" in parts:
        images = [(f"deploy-bench-usr-{s}m:v{IMAGE_VERSION}", "usr", s * MIB) for s in sizes]
        images.append((f"deploy-bench-random-100m:v{IMAGE_VERSION}", "random", 100 * MIB))
        print("==> test images (built once, FROM scratch; kept for the next run)", flush=True)
        for ref, kind, size in images:
            build_image(ref, kind, size, work)
        for ref, kind, size in images:
            entry = {"ref": ref, "save_bytes": save_size(ref), "floor": [], "naive": [],
                     "gzip": [], "zstd": []}
            results["images"].append(entry)
            for i in range(args.runs):
                for key, fn in (("floor", lambda: floor(ref, work)),
                                ("naive", lambda: naive(ref, work)),
                                ("gzip", lambda: ours(ref, work, "gzip")),
                                ("zstd", lambda: ours(ref, work, "zstd"))):
                    r = fn()
                    entry[key].append(r)
                    print(f"  {ref} run {i + 1}/{args.runs} {key:<5} {r['seconds']:7.2f} s"
                          + (f"  (package {r['package_size'] / 1e6:.1f} MB)" if "package_size" in r else ""),
                          flush=True)
    if "concurrent" in parts:
        print(f"==> {args.concurrent} concurrent transfers vs one", flush=True)
        size = args.concurrent_mib * MIB
        package = work / "concurrent.tar"
        if not package.exists() or package.stat().st_size != size:
            with open(package, "wb") as f:
                for _ in range(args.concurrent_mib):
                    f.write(os.urandom(MIB))
        max_uploads = args.max_uploads or args.concurrent
        rounds, disk = [], []
        binaries = [Bins.receiver] + ([Path(args.ab_receiver)] if args.ab_receiver else [])
        for i in range(args.runs):
            for n in (1, 0, args.concurrent):
                if n == 0:
                    disk.append(disk_floor(work, package))
                    print(f"  run {i + 1}/{args.runs}: disk write+fsync "
                          f"{disk[-1]['mbps']:.0f} MB/s", flush=True)
                    continue
                for binary in binaries:
                    Bins.receiver = binary
                    r = concurrent_round(work, package, n, size, max_uploads)
                    r["receiver"] = str(binary)
                    rounds.append(r)
                    print(f"  run {i + 1}/{args.runs}: {n} at once: {r['ok']}/{n} ok, "
                          f"{r['aggregate_mbps']:.0f} MB/s aggregate, receiver peak RSS "
                          f"{r['receiver_rss_mib']:.1f} MiB ({binary.name})", flush=True)
        Bins.receiver = binaries[0]
        results["concurrent"] = {"size": size, "n": args.concurrent, "max_uploads": max_uploads,
                                 "rounds": rounds, "disk": disk}
    if "burst" in parts:
        print(f"==> burst of {args.burst} small deploys", flush=True)
        results["burst"] = burst(work, args.burst)
        print(f"  {results['burst']['per_hour']:.0f} deploys/hour", flush=True)
    if "kafka" in parts:
        print("==> cargo bench -p deploy-events", flush=True)
        results["kafka"] = kafka()

    text = report(results, machine, args)
    print()
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
