"""The paths users run (issue 20): the machine's own limits, TLS, many idle connections, an
image of many small layers pulled by skopeo and containerd, and a cold pull through the cache.

Each function takes the shared `record(reg, key, value)` and measures one group; `run.py`
calls them for `--only limits,tls,idle,layers,cold`.
"""

import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import run as r

MIB = 1 << 20


# ------------------------------------------------------------------------------ machine limits


def sha256_per_core():
    """SHA-256 of 1 GiB in memory on one core (hashlib is OpenSSL's), MB/s."""
    buf = os.urandom(64 * MIB)
    h = hashlib.sha256()
    t = time.monotonic()
    for _ in range(16):
        h.update(buf)
    return 16 * 64 * MIB / (time.monotonic() - t) / 1e6


def loopback():
    """TCP over 127.0.0.1, one connection, 4 GiB in 4 MiB sends, MB/s."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    total = 4 << 30
    got = [0]

    def sink():
        c, _ = srv.accept()
        buf = bytearray(4 * MIB)
        view = memoryview(buf)
        while True:
            n = c.recv_into(view)
            if not n:
                break
            got[0] += n
        c.close()

    th = threading.Thread(target=sink)
    th.start()
    s = socket.create_connection(srv.getsockname())
    chunk = memoryview(os.urandom(4 * MIB))
    t = time.monotonic()
    for _ in range(total // len(chunk)):
        s.sendall(chunk)
    s.close()
    th.join()
    dt = time.monotonic() - t
    srv.close()
    return got[0] / dt / 1e6


def disk_write(work):
    """1 GiB written and fdatasync'ed where the registries keep their data, MB/s."""
    path = os.path.join(work, "disk-probe")
    chunk = os.urandom(16 * MIB)
    t = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for _ in range(64):
        os.write(fd, chunk)
    os.fdatasync(fd)
    os.close(fd)
    dt = time.monotonic() - t
    os.unlink(path)
    return 64 * 16 * MIB / dt / 1e6


def limits(record, reg, work, runs):
    for _ in range(runs):
        record(reg, "limit: SHA-256 on one core (MB/s)", sha256_per_core())
        record(reg, "limit: loopback TCP, one connection (MB/s)", loopback())
        record(reg, "limit: disk write + fdatasync (MB/s)", disk_write(work))


# ------------------------------------------------------------------------------------------ TLS


def self_signed(work):
    """A certificate and key for 127.0.0.1."""
    crt, key = os.path.join(work, "tls.crt"), os.path.join(work, "tls.key")
    if not os.path.exists(crt):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", key, "-out", crt, "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return crt, key


def tls(record, work, runs, load_s, big, digest, n_head):
    """Berth over TLS: small requests (plain and with a Bearer token) and 1 GiB push and pull;
    compare with the plain rows of the same run."""
    crt, key = self_signed(work)
    tls_cfg = f'[tls]\ncert = "{crt}"\nkey = "{key}"\n'
    reg = r.Registry("berth", work, config=tls_cfg)
    reg.start = _start_https(reg, crt)
    reg.start()
    try:
        base = f"https://127.0.0.1:{reg.port}"
        cfg = b'{"architecture":"amd64","os":"linux","bench":"tls"}'
        cd = _curl_put_small(base, crt, "bench/small", cfg)
        m = r.manifest_for(cd, len(cfg))
        _curl(base, crt, ["-X", "PUT", "-H", f"Content-Type: {r.OCI_MANIFEST}", "--data-binary", "@-"],
              "/v2/bench/small/manifests/latest", stdin=m, want="201")
        for _ in range(runs):
            rps, _, p99 = r.wrk(f"{base}/v2/bench/small/manifests/latest", load_s)
            record(reg, "TLS: manifest GET by tag, 32 conns (req/s)", rps)
            record(reg, "TLS: manifest GET p99 (ms)", p99)
            rps, _, p99 = r.ab_head(f"{base}/v2/bench/small/blobs/{cd}", n_head)
            record(reg, "TLS: blob HEAD, 32 conns (req/s)", rps)
            record(reg, "TLS: blob HEAD p99 (ms)", p99)
            record(reg, "TLS: push 1 GiB monolithic (MB/s)", _push_big(base, crt, big, digest))
            record(reg, "TLS: pull 1 GiB blob, curl (MB/s)", _pull_big(base, crt, digest))
    finally:
        reg.stop()


def _start_https(reg, crt):
    """Registry.start for a TLS port: wait on https instead of http."""
    def start():
        log = open(os.path.join(reg.dir, "log"), "ab")
        cfg = os.path.join(reg.dir, "berth.toml")
        with open(cfg, "w") as f:
            f.write(reg.config)
        reg.proc = subprocess.Popen([r.BERTH, "serve", "--listen", f"127.0.0.1:{reg.port}", "--data",
                                     os.path.join(reg.dir, "data"), "--config", cfg],
                                    stdout=subprocess.DEVNULL, stderr=log)
        for _ in range(300):
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", crt,
                                  f"https://127.0.0.1:{reg.port}/v2/"], capture_output=True, text=True)
            if out.stdout == "200":
                return 0
            time.sleep(0.05)
        raise SystemExit("berth over TLS did not start")
    return start


def _curl(base, crt, args, path, stdin=None, want=None):
    out = subprocess.run(["curl", "-sS", "--cacert", crt, "-o", "/dev/null", "-w", "%{http_code}", *args,
                          base + path], input=stdin, capture_output=True)
    code = out.stdout.decode()
    assert want is None or code == want, (code, out.stderr)
    return code


def _curl_put_small(base, crt, repo, data):
    d = r.sha(data)
    _curl(base, crt, ["-X", "POST", "-H", "Content-Type: application/octet-stream", "--data-binary", "@-"],
          f"/v2/{repo}/blobs/uploads/?digest={d}", stdin=data, want="201")
    return d


def _push_big(base, crt, big, digest):
    loc = subprocess.run(["curl", "-sS", "--cacert", crt, "-X", "POST", "-D", "-", "-o", "/dev/null",
                          f"{base}/v2/bench/mono/blobs/uploads/"], capture_output=True, text=True).stdout
    loc = next(l.split(":", 1)[1].strip() for l in loc.splitlines() if l.lower().startswith("location:"))
    sep = "&" if "?" in loc else "?"
    r.settle()
    t = time.monotonic()
    _curl(base, crt, ["-X", "PUT", "-H", "Content-Type: application/octet-stream", "-T", big],
          f"{loc}{sep}digest={digest}", want="201")
    return os.path.getsize(big) / (time.monotonic() - t) / 1e6


def _pull_big(base, crt, digest):
    t = time.monotonic()
    _curl(base, crt, ["-L"], f"/v2/bench/mono/blobs/{digest}", want="200")
    return r.SIZE / (time.monotonic() - t) / 1e6


# ------------------------------------------------------------------------- idle connections


def idle(record, work, runs, conns=10_000):
    """`conns` kept-alive connections that made one request and then idle: Berth's RSS with
    them open, and a new client's manifest GET p99 meanwhile. (Berth serves as many connections
    as its open-file limit allows: on a machine whose hard limit is low, this needs it raised.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, conns + 1024)), hard))
    reg = r.Registry("berth", work, config=f"[limits]\nmax_connections = {conns + 1024}\n")
    reg.start()
    try:
        cfg = b'{"architecture":"amd64","os":"linux","bench":"idle"}'
        cd = r.push_small(reg, "bench/small", cfg)
        r.put_manifest(r.conn(reg), "bench/small", "latest", r.manifest_for(cd, len(cfg)))
        for _ in range(runs):
            before = reg.status("VmRSS")
            socks = []
            t = time.monotonic()
            for _ in range(conns):
                s = socket.create_connection(("127.0.0.1", reg.port))
                s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
                socks.append(s)
            for s in socks:
                s.recv(4096)
            opened = time.monotonic() - t
            # Within the 30 s header timeout that also closes idle connections.
            record(reg, f"{conns} idle connections: RSS (MiB)", reg.status("VmRSS"))
            record(reg, f"{conns} idle connections: RSS added (MiB)", reg.status("VmRSS") - before)
            record(reg, f"{conns} idle connections: new client's manifest GET p99 (ms)",
                   r.latency_p99_single(reg, "/v2/bench/small/manifests/latest", n=500))
            record(reg, f"{conns} idle connections: opened in (s)", opened)
            for s in socks:
                s.close()
            time.sleep(1)
    finally:
        reg.stop()


# ---------------------------------------------------------------- many small layers, cold cache


def small_layer_image(work, layers=40, seed=1):
    """An OCI layout of one image with `layers` layers of a few KiB to 1 MiB (random bytes, so
    nothing is shared between images of different seeds)."""
    d = os.path.join(work, f"layers-{seed}")
    if os.path.exists(d):
        return d
    os.makedirs(os.path.join(d, "blobs", "sha256"))
    rng = __import__("random").Random(seed)
    descs = []
    total = 0
    for _ in range(layers):
        n = rng.choice([4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20])
        data = os.urandom(n)
        dg = r.sha(data)
        open(os.path.join(d, "blobs", "sha256", dg[7:]), "wb").write(data)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": dg, "size": n})
        total += n
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": [x["digest"] for x in descs]}}).encode()
    cd = r.sha(cfg)
    open(os.path.join(d, "blobs", "sha256", cd[7:]), "wb").write(cfg)
    m = json.dumps({"schemaVersion": 2, "mediaType": r.OCI_MANIFEST,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd,
                               "size": len(cfg)}, "layers": descs}).encode()
    md = r.sha(m)
    open(os.path.join(d, "blobs", "sha256", md[7:]), "wb").write(m)
    open(os.path.join(d, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
    json.dump({"schemaVersion": 2, "manifests": [{"mediaType": r.OCI_MANIFEST, "digest": md, "size": len(m),
                                                  "annotations": {"org.opencontainers.image.ref.name": "v1"}}]},
              open(os.path.join(d, "index.json"), "w"))
    return d


def skopeo_pull_s(port, repo, work, policy):
    dest = tempfile.mkdtemp(prefix="pulled-", dir=work)
    t = time.monotonic()
    r.skopeo(["copy", "--src-tls-verify=false", f"docker://127.0.0.1:{port}/{repo}:v1", f"oci:{dest}:v1"], policy)
    dt = time.monotonic() - t
    shutil.rmtree(dest, ignore_errors=True)
    return dt


class Containerd:
    """A containerd of its own (fresh content store), as the real-client tests start it."""

    def __init__(self, work):
        self.dir = tempfile.mkdtemp(prefix="containerd-", dir=work)
        self.sock = os.path.join(self.dir, "containerd.sock")
        cfg = os.path.join(self.dir, "config.toml")
        open(cfg, "w").write(f'version = 2\nroot = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
                             f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "{self.sock}"\n')
        self.proc = subprocess.Popen(["containerd", "--config", cfg], stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.dir, "log"), "wb"))
        for _ in range(200):
            if subprocess.run(["ctr", "-a", self.sock, "version"], capture_output=True).returncode == 0:
                return
            time.sleep(0.05)
        raise SystemExit("containerd did not start")

    def fetch_s(self, port, repo):
        t = time.monotonic()
        out = subprocess.run(["ctr", "-a", self.sock, "-n", "bench", "content", "fetch", "--plain-http",
                              f"127.0.0.1:{port}/{repo}:v1"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return time.monotonic() - t

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def cpu_s(pid):
    """User + system CPU seconds process `pid` has used (10 ms ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s():
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def layers(record, regs, work, policy, runs):
    """A 40-layer image of small layers pulled with skopeo and containerd's ctr (a fresh
    content store each time), wall time; and for skopeo the CPU the registry and skopeo
    itself used during the pull, which tells how much of the wall time the server can move."""
    layout = small_layer_image(work)
    for reg in regs:
        reg.start()
        try:
            r.skopeo(["copy", "--dest-tls-verify=false", f"oci:{layout}:v1",
                      f"docker://127.0.0.1:{reg.port}/bench/layers:v1"], policy)
            for _ in range(runs):
                server, client = cpu_s(reg.proc.pid), children_cpu_s()
                record(reg, "pull 40 small layers, skopeo (s)", skopeo_pull_s(reg.port, "bench/layers", work, policy))
                record(reg, "  the registry's CPU during it (s)", cpu_s(reg.proc.pid) - server)
                record(reg, "  skopeo's own CPU during it (s)", children_cpu_s() - client)
                c = Containerd(work)
                try:
                    server = cpu_s(reg.proc.pid)
                    record(reg, "pull 40 small layers, ctr content fetch (s)", c.fetch_s(reg.port, "bench/layers"))
                    record(reg, "  the registry's CPU during the ctr fetch (s)", cpu_s(reg.proc.pid) - server)
                finally:
                    c.stop()
        finally:
            reg.stop()


class DelayProxy:
    """A TCP proxy on loopback that holds the bytes of each direction `rtt / 2` seconds before
    passing them on: an upstream a round trip of `rtt` away, as Docker Hub is from a cluster,
    without touching the machine's network settings."""

    def __init__(self, target_port, rtt):
        import asyncio
        self.port = r.free_port()
        self.loop = asyncio.new_event_loop()
        half = rtt / 2

        async def pipe(reader, writer):
            q = asyncio.Queue()

            async def feed():
                while True:
                    data = await reader.read(256 * 1024)
                    await q.put((self.loop.time() + half, data))
                    if not data:
                        return

            async def send():
                while True:
                    due, data = await q.get()
                    if due > self.loop.time():
                        await asyncio.sleep(due - self.loop.time())
                    if not data:
                        if writer.can_write_eof():
                            writer.write_eof()
                        return
                    writer.write(data)
                    await writer.drain()

            try:
                await asyncio.gather(feed(), send())
            except (ConnectionError, OSError):
                pass

        async def handle(cr, cw):
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", target_port)
            except OSError:
                cw.close()
                return
            try:
                await asyncio.gather(pipe(cr, uw), pipe(ur, cw))
            except asyncio.CancelledError:
                pass  # stopped while the connection was open
            finally:
                cw.close()
                uw.close()

        async def serve():
            self.server = await asyncio.start_server(handle, "127.0.0.1", self.port)

        self.loop.run_until_complete(serve())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def stop(self):
        import asyncio

        async def close():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def cold_large(record, up, work, big, digest):
    """One run of the 1 GiB layer (pushed to `up` as bench/mono) pulled with curl from the
    upstream directly, then through a fresh Berth cache of it (MB/s; the cache's CPU too)."""
    r.settle()
    record(up, "pull 1 GiB blob from the upstream directly, curl (MB/s)", r.pull_curl(up, digest))
    mirror = r.Registry("berth", work, config=(
        f'[[proxy.upstream]]\nname = "127.0.0.1:{up.port}"\nurl = "http://127.0.0.1:{up.port}"\n'))
    mirror.start()
    try:
        r.settle()
        cpu = cpu_s(mirror.proc.pid)
        t = time.monotonic()
        out = subprocess.run(["curl", "-sf", "-o", "/dev/null", mirror.url(
            f"/v2/bench/mono/blobs/{digest}?ns=127.0.0.1:{up.port}")])
        dt = time.monotonic() - t
        assert out.returncode == 0, out
        record(up, "pull 1 GiB blob through a cold cache, curl (MB/s)", r.SIZE / dt / 1e6)
        record(up, "cache CPU per cold 1 GiB pull (s)", cpu_s(mirror.proc.pid) - cpu)
    finally:
        mirror.stop()
        shutil.rmtree(mirror.dir, ignore_errors=True)


def cold(record, work, policy, runs, big, digest):
    """The 40-layer image pulled through a cold Berth cache from a loopback upstream (another
    Berth), against pulling it from the upstream directly; a fresh cache each run. Then the
    same with the upstream 20 ms away (a delaying proxy in front of it, for the direct pull
    too), with the cache's read-ahead of layers on and off. Last, the 1 GiB layer through a
    cold cache (`cold_large`)."""
    layout = small_layer_image(work, seed=2)
    up = r.Registry("berth", work)
    up.start()

    def through_cache(port, label, extra=""):
        mirror = r.Registry("berth", work, config=(
            f'[[proxy.upstream]]\nname = "127.0.0.1:{port}"\nurl = "http://127.0.0.1:{port}"\n'
            f"default = true\n{extra}"))
        mirror.start()
        try:
            record(up, f"pull 40 small layers through a cold cache{label}, skopeo (s)",
                   skopeo_pull_s(mirror.port, "bench/layers", work, policy))
            if not extra:
                record(up, f"pull 40 small layers through the warm cache{label}, skopeo (s)",
                       skopeo_pull_s(mirror.port, "bench/layers", work, policy))
        finally:
            mirror.stop()
            shutil.rmtree(mirror.dir, ignore_errors=True)

    far = None
    try:
        r.skopeo(["copy", "--dest-tls-verify=false", f"oci:{layout}:v1",
                  f"docker://127.0.0.1:{up.port}/bench/layers:v1"], policy)
        for n in range(runs):
            record(up, "pull 40 small layers from the upstream directly, skopeo (s)",
                   skopeo_pull_s(up.port, "bench/layers", work, policy))
            through_cache(up.port, "")
        far = DelayProxy(up.port, 0.020)
        for n in range(runs):
            record(up, "pull 40 small layers from the upstream 20 ms away directly, skopeo (s)",
                   skopeo_pull_s(far.port, "bench/layers", work, policy))
            through_cache(far.port, " (upstream 20 ms away)")
            through_cache(far.port, " (upstream 20 ms away, read_ahead = false)",
                          "read_ahead = false\n")
        r.push_monolithic(up, big, digest)
        for n in range(runs):
            cold_large(record, up, work, big, digest)
    finally:
        if far:
            far.stop()
        up.stop()
