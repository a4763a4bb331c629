#!/usr/bin/env python3
"""Berth against the reference registry (CNCF Distribution 2.8, Debian's docker-registry).

Both run side by side on loopback with equivalent settings (filesystem storage in a temp dir, no
auth, info logging). Every figure is measured for both, RUNS times, and reported as the median
and the ratio Berth/Distribution. Benchmarks are not tests: nothing here asserts a speed.

Usage: bench/run [--runs N] [--quick] [--only push,small,auth,listing,startup] [--out FILE]
(bench/run installs what it needs). The groups of `paths.py` (the machine's limits, TLS, idle
connections, many small layers, a cold cache) run when named: `--only limits,tls,idle,layers,cold`;
`--only ui` times the web UI's pages over 10,000 repositories and tags (Berth only).
"""

import argparse
import gzip
import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BERTH = os.path.join(ROOT, "target", "release", "berth")
GIB = 1 << 30
SIZE = GIB  # bytes of the pushed layer file, set in main()
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_up(port, proc, what):
    for _ in range(300):
        if proc.poll() is not None:
            sys.exit(f"{what} exited at start")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/v2/")
            c.getresponse().read()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"{what} did not start")


class Registry:
    """A registry process: "berth" (with `config`, TOML text, and further `args` when given)
    or "distribution"."""

    def __init__(self, name, work, config=None, args=()):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"bench-{name}-", dir=work)
        self.port = free_port()
        self.proc = None
        self.config = config
        self.args = list(args)

    def url(self, path=""):
        if path.startswith("http"):
            return path  # Distribution answers with absolute Locations
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self):
        log = open(os.path.join(self.dir, "log"), "ab")
        t = time.monotonic()
        if self.name != "distribution":
            cmd = [BERTH, "serve", "--listen", f"127.0.0.1:{self.port}", "--data", os.path.join(self.dir, "data")]
            if self.config is not None:
                cfg = os.path.join(self.dir, "berth.toml")
                with open(cfg, "w") as f:
                    f.write(self.config)
                cmd += ["--config", cfg]
            self.proc = subprocess.Popen(cmd + self.args, stdout=subprocess.DEVNULL, stderr=log,
                                         env={**os.environ, "RUST_LOG": "info"})
        else:
            cfg = os.path.join(self.dir, "config.yml")
            with open(cfg, "w") as f:
                f.write(f"version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {self.dir}/data\n"
                        f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{self.port}\n")
            self.proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL, stderr=log)
        wait_up(self.port, self.proc, self.name)
        return time.monotonic() - t

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def status(self, key):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # MiB
        return 0.0

    def reset_peak(self):
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")


def conn(reg):
    return http.client.HTTPConnection("127.0.0.1", reg.port, timeout=600)


def request(c, method, path, body=None, headers=None):
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_small(reg, repo, data):
    c = conn(reg)
    d = sha(data)
    st, h, _ = request(c, "POST", f"/v2/{repo}/blobs/uploads/")
    loc = h["location"]
    sep = "&" if "?" in loc else "?"
    st, _, body = request(c, "PUT", f"{loc}{sep}digest={d}", data, {"Content-Type": "application/octet-stream"})
    assert st == 201, (st, body)
    return d


def manifest_for(config_digest, config_len, layers=()):
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_len},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n} for d, n in layers],
    }).encode()


def put_manifest(c, repo, ref, m):
    st, _, body = request(c, "PUT", f"/v2/{repo}/manifests/{ref}", m, {"Content-Type": OCI_MANIFEST})
    assert st == 201, (st, body)


# ------------------------------------------------------------------------------------------- push


def settle():
    """Writes every dirty page back before a timed push. Berth syncs a blob before it answers,
    so its push would otherwise also wait for the write-back of whatever came before it (the
    layer files the bench just made, the previous push); both registries start clean."""
    os.sync()


def push_monolithic(reg, path, digest):
    c = conn(reg)
    _, h, _ = request(c, "POST", "/v2/bench/mono/blobs/uploads/")
    loc = h["location"]
    sep = "&" if "?" in loc else "?"
    settle()
    t = time.monotonic()
    out = subprocess.run(["curl", "-sS", "-X", "PUT", "-H", "Content-Type: application/octet-stream", "-T", path,
                          "-w", "%{http_code}", "-o", "/dev/null", reg.url(f"{loc}{sep}digest={digest}")],
                         capture_output=True, text=True)
    dt = time.monotonic() - t
    assert out.stdout == "201", (out.stdout, out.stderr)
    return SIZE / dt / 1e6


def chunk_files(path, chunk):
    """`path` cut into files of `chunk` bytes beside it (made once, outside any timing)."""
    parts = []
    with open(path, "rb") as f:
        i = 0
        while True:
            part = f"{path}.part{i:03d}"
            if not os.path.exists(part):
                data = f.read(chunk)
                if not data:
                    break
                with open(part, "wb") as out:
                    out.write(data)
            else:
                f.seek(os.path.getsize(part), 1)
            parts.append(part)
            i += 1
            if f.tell() >= os.path.getsize(path):
                break
    return parts


def push_chunked(reg, path, digest, chunk=64 << 20):
    """Chunked PATCHes on one kept-alive connection, as clients send them, each body sent by
    the kernel from the file (`sendfile`): Python's own body loop would measure itself (with
    it this figure was half the monolithic one), and a curl process per chunk adds its start
    and a new connection to every chunk."""
    parts = chunk_files(path, chunk)
    c = conn(reg)
    _, h, _ = request(c, "POST", "/v2/bench/chunked/blobs/uploads/")
    loc = h["location"]
    settle()
    t = time.monotonic()
    off = 0
    for part in parts:
        n = os.path.getsize(part)
        c.putrequest("PATCH", path_of(loc), skip_accept_encoding=True)
        for k, v in (("Content-Type", "application/octet-stream"),
                     ("Content-Range", f"{off}-{off + n - 1}"), ("Content-Length", str(n))):
            c.putheader(k, v)
        c.endheaders()
        with open(part, "rb") as f:
            c.sock.sendfile(f)
        r = c.getresponse()
        body = r.read()
        assert r.status == 202, (r.status, body)
        loc = r.getheader("location")
        off += n
    loc = path_of(loc)
    sep = "&" if "?" in loc else "?"
    st, _, body = request(c, "PUT", f"{loc}{sep}digest={digest}")
    assert st == 201, (st, body)
    return SIZE / (time.monotonic() - t) / 1e6


def path_of(location):
    """The path and query of a Location header (Distribution's are absolute URLs)."""
    u = urllib.parse.urlsplit(location)
    return u.path + (f"?{u.query}" if u.query else "")


def make_layer(path):
    """1 GiB of random bytes as gzip with stored blocks (clients keep it as it is); returns
    (digest, size)."""
    h = hashlib.sha256()

    class Tee:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            h.update(b)
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    with open(path, "wb") as raw:
        with gzip.GzipFile(fileobj=Tee(raw), mode="wb", compresslevel=0) as f:
            for _ in range(GIB // (16 << 20)):
                f.write(os.urandom(16 << 20))
    return "sha256:" + h.hexdigest(), os.path.getsize(path)


def oci_layout(work, name, path, digest):
    """An OCI layout holding one image whose layer is the file at `path`."""
    d = os.path.join(work, name)
    if os.path.exists(os.path.join(d, "index.json")):
        return d
    os.makedirs(os.path.join(d, "blobs", "sha256"))
    os.link(path, os.path.join(d, "blobs", "sha256", digest[7:]))
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest]}}).encode()
    cd = sha(cfg)
    open(os.path.join(d, "blobs", "sha256", cd[7:]), "wb").write(cfg)
    m = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": os.path.getsize(path)}],
    }).encode()
    md = sha(m)
    open(os.path.join(d, "blobs", "sha256", md[7:]), "wb").write(m)
    open(os.path.join(d, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
    json.dump({"schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, "digest": md, "size": len(m),
                                                  "annotations": {"org.opencontainers.image.ref.name": "v1"}}]},
              open(os.path.join(d, "index.json"), "w"))
    return d


def skopeo(args, policy):
    out = subprocess.run(["skopeo", "--policy", policy] + args, capture_output=True)
    assert out.returncode == 0, out.stderr.decode()


def push_skopeo(reg, work, policy, n):
    path = os.path.join(work, "skopeo-layer.bin")
    digest, _ = make_layer(path)
    layout = oci_layout(work, f"layout-{reg.name}-{n}", path, digest)
    os.unlink(path)
    settle()
    t = time.monotonic()
    skopeo(["copy", "--dest-tls-verify=false", "--preserve-digests",
            f"oci:{layout}:v1", f"docker://127.0.0.1:{reg.port}/bench/skopeo{n}:v1"], policy)
    return SIZE / (time.monotonic() - t) / 1e6


def pull_curl(reg, digest):
    t = time.monotonic()
    out = subprocess.run(["curl", "-sfL", "-o", "/dev/null", reg.url(f"/v2/bench/mono/blobs/{digest}")])
    assert out.returncode == 0
    return SIZE / (time.monotonic() - t) / 1e6


def pull_skopeo(reg, work, policy, n):
    dest = os.path.join(work, f"pulled-{reg.name}-{n}")
    t = time.monotonic()
    skopeo(["copy", "--src-tls-verify=false", f"docker://127.0.0.1:{reg.port}/bench/skopeo0:v1", f"oci:{dest}:v1"], policy)
    dt = time.monotonic() - t
    shutil.rmtree(dest, ignore_errors=True)
    return SIZE / dt / 1e6


def drop_layouts(work):
    for name in os.listdir(work):
        if name.startswith("layout-"):
            shutil.rmtree(os.path.join(work, name), ignore_errors=True)


# --------------------------------------------------------------------------------------- requests


def wrk(url, seconds, conns=32, header=None):
    extra = ["-H", header] if header else []
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", *extra, url],
                         capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    return rps, pct(50), pct(99)


def ab_head(url, n, conns=32, header=None):
    extra = ["-H", header] if header else []
    out = subprocess.run(["ab", "-q", "-k", "-i", "-n", str(n), "-c", str(conns), *extra, url],
                         capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))
    p50 = float(re.search(r"\s50%\s+(\d+)", out).group(1))
    p99 = float(re.search(r"\s99%\s+(\d+)", out).group(1))
    return rps, p50, p99


def latency_p99(reg, path, n=20):
    """p99 (of `n`: Distribution walks its storage for every catalog page) of fetching `path`
    and every page its Link headers lead to, in ms."""
    c = conn(reg)
    times = []
    for _ in range(n):
        t = time.monotonic()
        url = path
        while url:
            st, h, _ = request(c, "GET", url)
            assert st == 200, (st, url)
            m = re.match(r"<([^>]+)>", h.get("link", ""))
            url = m.group(1) if m else None
        times.append((time.monotonic() - t) * 1000)
    times.sort()
    return times[int(len(times) * 0.99) - 1]


def latency_p99_single(reg, path, n=200):
    c = conn(reg)
    times = []
    for _ in range(n):
        t = time.monotonic()
        st, _, _ = request(c, "GET", path)
        times.append((time.monotonic() - t) * 1000)
        assert st == 200, (st, path)
    times.sort()
    return times[int(len(times) * 0.99) - 1]


def populate_listing(reg, repos, tags):
    """`repos` repositories with one manifest each, and one repository with `tags` tags."""
    cfg = b'{"architecture":"amd64","os":"linux"}'

    def one_repo(i):
        c = conn(reg)
        d = push_small(reg, f"many/r{i:05d}", cfg)
        put_manifest(c, f"many/r{i:05d}", "v1", manifest_for(d, len(cfg)))

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(one_repo, range(repos)))
    d = push_small(reg, "tagged/repo", cfg)

    def tag_batch(start):
        c = conn(reg)
        for i in range(start, min(start + 500, tags)):
            put_manifest(c, "tagged/repo", f"t{i:05d}", manifest_for(d, len(cfg)))

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(tag_batch, range(0, tags, 500)))


def ui_server_p99(reg, path, n=100):
    """p99 of the server time a UI page took (its Server-Timing header), and of the whole
    request as the client saw it, in ms."""
    c = conn(reg)
    server, wall = [], []
    for _ in range(n):
        t = time.monotonic()
        st, h, _ = request(c, "GET", path)
        wall.append((time.monotonic() - t) * 1000)
        assert st == 200, (st, path)
        server.append(float(h["server-timing"].split("dur=")[1]))
    server.sort()
    wall.sort()
    return server[int(n * 0.99) - 1], wall[int(n * 0.99) - 1]


def ui_pages(record, reg, listing_n, runs, load_s, cd):
    """The web UI's pages over `listing_n` repositories and tags (Berth only), and the API's
    small-request figures with the UI on and off."""
    pages = [
        ("search among repositories", "/ui/?q=r04321"),
        ("repositories, first page", "/ui/"),
        ("repositories, page after r09000", "/ui/?q=&after=many%2Fr09000"),
        (f"repository of {listing_n} tags", "/ui/repo?name=tagged/repo"),
        (f"repository of {listing_n} tags, deep page", "/ui/repo?name=tagged/repo&after=t09000"),
        ("image", "/ui/image?name=tagged/repo&ref=t00500"),
        ("compare", "/ui/compare?name=tagged/repo&a=t00001&b=t00002"),
        ("cache", "/ui/cache"),
    ]
    for _ in range(runs):
        for label, path in pages:
            server, wall = ui_server_p99(reg, path)
            record(reg, f"UI {label}: server p99 (ms)", server)
            record(reg, f"UI {label}: request p99 (ms)", wall)
    # On and off interleaved, run by run, so that a slower minute of the machine hits both.
    off = Registry("berth", tempfile.mkdtemp(dir=os.path.dirname(reg.dir)), config="[ui]\nenabled = false\n")
    off.start()
    try:
        cfg = b'{"architecture":"amd64","os":"linux","bench":true}'
        d = push_small(off, "bench/small", cfg)
        for _ in range(runs):
            rps, _, _ = wrk(reg.url(f"/v2/bench/small/blobs/{cd}"), load_s)
            record(reg, "blob GET with the UI on, 32 conns (req/s)", rps)
            rps, _, _ = wrk(off.url(f"/v2/bench/small/blobs/{d}"), load_s)
            record(reg, "blob GET with the UI off, 32 conns (req/s)", rps)
    finally:
        off.stop()


def populate_blobs(reg, n):
    def batch(start):
        c = conn(reg)
        for i in range(start, min(start + 1000, n)):
            data = f"blob {i}".encode()
            st, h, _ = request(c, "POST", "/v2/startup/blobs/uploads/")
            loc = h["location"]
            sep = "&" if "?" in loc else "?"
            st, _, _ = request(c, "PUT", f"{loc}{sep}digest={sha(data)}", data)
            assert st == 201

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(batch, range(0, n, 1000)))


def token_auth_berth(work):
    """A Berth with token auth and one user; it, the user's Basic header, and a Bearer header
    for pull and push on bench/small from its token service."""
    import base64
    line = subprocess.run([BERTH, "passwd", "bench"], input="bench-pass\n", capture_output=True,
                          text=True, check=True).stdout.strip()
    htpasswd = os.path.join(work, "htpasswd")
    with open(htpasswd, "w") as f:
        f.write(line + "\n")
    reg = Registry("berth", work, config=f'[auth]\nmode = "token"\nhtpasswd = "{htpasswd}"\n')
    reg.start()
    basic = "Basic " + base64.b64encode(b"bench:bench-pass").decode()
    c = conn(reg)
    st, h, _ = request(c, "GET", "/v2/")
    challenge = h["www-authenticate"]
    realm = re.search(r'realm="([^"]+)"', challenge).group(1)
    service = re.search(r'service="([^"]+)"', challenge).group(1)
    path = realm.split("/", 3)[3] if realm.startswith("http") else realm
    st, _, body = request(c, "GET", f"/{path}?service={service}&scope=repository:bench/small:pull,push",
                          headers={"Authorization": basic})
    assert st == 200, (st, body)
    return reg, basic, "Bearer " + json.loads(body)["token"]


# ------------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="shorter loads and smaller listings")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--berth", default=None, help="the berth binary to measure (default: this build)")
    ap.add_argument("--no-distribution", action="store_true",
                    help="measure Berth only (to compare two Berth builds run by run)")
    ap.add_argument("--only", default="push,small,auth,listing,startup",
                    help="comma-separated groups to run: push, small, auth, listing, startup, "
                         "limits, tls, idle, layers, cold, ui")
    a = ap.parse_args()
    only = set(a.only.split(","))
    global BERTH
    if a.berth:
        BERTH = os.path.abspath(a.berth)
    load_s = 3 if a.quick else 10
    listing_n = 1000 if a.quick else 10_000
    startup_n = 10_000 if a.quick else 100_000

    work = tempfile.mkdtemp(prefix="berth-bench-")
    policy = os.path.join(work, "policy.json")
    open(policy, "w").write('{"default":[{"type":"insecureAcceptAnything"}]}')
    # The layer pushed with curl; skopeo gets a fresh layer per run and registry, or it would
    # mount the blob it already knows instead of uploading it.
    global SIZE
    big = os.path.join(work, "layer.bin")
    digest, SIZE = make_layer(big)
    chunk_files(big, 64 << 20)  # the chunked push's parts, made before any timing

    regs = [Registry("berth", work)]
    if not a.no_distribution:
        regs.append(Registry("distribution", work))
    results = {r.name: {} for r in regs}

    def record(reg, key, value):
        results[reg.name].setdefault(key, []).append(value)
        print(f"  {reg.name:<13} {key:<52} {value:10.2f}", flush=True)

    try:
        for reg in regs:
            reg.start()
            time.sleep(0.5)
            record(reg, "RSS idle (MiB)", reg.status("VmRSS"))
            for n in range(a.runs if "push" in only else 0):
                reg.reset_peak()
                record(reg, "push 1 GiB monolithic (MB/s)", push_monolithic(reg, big, digest))
                record(reg, "peak RSS during 1 GiB push (MiB)", reg.status("VmHWM"))
                record(reg, "push 1 GiB chunked, 64 MiB PATCHes on one connection (MB/s)", push_chunked(reg, big, digest))
                record(reg, "push 1 GiB via skopeo (MB/s)", push_skopeo(reg, work, policy, n))
                record(reg, "pull 1 GiB blob, curl (MB/s)", pull_curl(reg, digest))
                record(reg, "pull 1 GiB via skopeo (MB/s)", pull_skopeo(reg, work, policy, n))
                drop_layouts(work)
            # Small requests.
            c = conn(reg)
            cfg = b'{"architecture":"amd64","os":"linux","bench":true}'
            cd = push_small(reg, "bench/small", cfg)
            put_manifest(c, "bench/small", "latest", manifest_for(cd, len(cfg)))
            for n in range(a.runs if "small" in only else 0):
                reg.reset_peak()
                rps, p50, p99 = wrk(reg.url("/v2/bench/small/manifests/latest"), load_s)
                record(reg, "manifest GET by tag, 32 conns (req/s)", rps)
                record(reg, "manifest GET p50 (ms)", p50)
                record(reg, "manifest GET p99 (ms)", p99)
                record(reg, "peak RSS under GET load (MiB)", reg.status("VmHWM"))
                rps, p50, p99 = ab_head(reg.url(f"/v2/bench/small/blobs/{cd}"), 20000 if a.quick else 100000)
                record(reg, "blob HEAD, 32 conns (req/s)", rps)
                record(reg, "blob HEAD p50 (ms)", p50)
                record(reg, "blob HEAD p99 (ms)", p99)
            if "auth" in only and reg.name == "berth":
                # The same small requests with a Bearer token on each (Berth only: the ratio
                # that matters is against its own plain figure above).
                areg, basic, bearer = token_auth_berth(work)
                ac = conn(areg)
                st, h, _ = request(ac, "POST", f"/v2/bench/small/blobs/uploads/?digest={cd}", cfg,
                                   {"Authorization": basic})
                assert st == 201, st
                m = manifest_for(cd, len(cfg))
                st, _, _ = request(ac, "PUT", "/v2/bench/small/manifests/latest", m,
                                   {"Authorization": basic, "Content-Type": OCI_MANIFEST})
                assert st == 201, st
                for n in range(a.runs):
                    rps, _, p99 = wrk(areg.url("/v2/bench/small/manifests/latest"), load_s,
                                      header=f"Authorization: {bearer}")
                    record(reg, "manifest GET, token auth, 32 conns (req/s)", rps)
                    record(reg, "manifest GET, token auth, p99 (ms)", p99)
                    rps, _, p99 = ab_head(areg.url(f"/v2/bench/small/blobs/{cd}"),
                                          20000 if a.quick else 100000, header=f"Authorization: {bearer}")
                    record(reg, "blob HEAD, token auth, 32 conns (req/s)", rps)
                    record(reg, "blob HEAD, token auth, p99 (ms)", p99)
                areg.stop()
            if "listing" in only or ("ui" in only and reg.name == "berth"):
                populate_listing(reg, listing_n, listing_n)
            if "ui" in only and reg.name == "berth":
                ui_pages(record, reg, listing_n, a.runs, load_s, cd)
            for n in range(a.runs if "listing" in only else 0):
                # Distribution refuses n > 1000 on the catalog: walk it in pages of 1000.
                record(reg, f"catalog of {listing_n} repos, pages of 1000, p99 (ms)", latency_p99(reg, "/v2/_catalog?n=1000"))
                record(reg, "catalog page of 1000, p99 (ms)", latency_p99_single(reg, "/v2/_catalog?n=1000"))
                record(reg, f"tags list of {listing_n} tags, p99 (ms)", latency_p99(reg, "/v2/tagged/repo/tags/list"))
            if "startup" in only:
                populate_blobs(reg, startup_n)
            reg.stop()
            for n in range(a.runs if "startup" in only else 0):
                record(reg, f"start-up with {startup_n} blobs stored (ms)", reg.start() * 1000)
                reg.stop()
        # The paths users run (issue 20): Berth alone unless the row compares registries.
        sys.modules.setdefault("run", sys.modules[__name__])
        import paths
        if "limits" in only:
            paths.limits(record, regs[0], work, a.runs)
        if "tls" in only:
            paths.tls(record, work, a.runs, load_s, big, digest, 20000 if a.quick else 100000)
        if "idle" in only:
            paths.idle(record, work, a.runs)
        if "layers" in only:
            paths.layers(record, regs, work, policy, a.runs)
        if "cold" in only:
            paths.cold(record, work, policy, a.runs, big, digest)
    finally:
        for r in regs:
            r.stop()
        shutil.rmtree(work, ignore_errors=True)

    if a.no_distribution:
        for k, runs in results["berth"].items():
            print(f"{k:<52} {statistics.median(runs):>12.2f}   runs: {', '.join(f'{v:.2f}' for v in runs)}")
        if a.out:
            json.dump(results["berth"], open(a.out, "w"), indent=1)
        return
    keys = [k for k in results["berth"] if k in results["distribution"]]
    print(f"\n{'measure':<48} {'berth':>12} {'distribution':>14} {'ratio':>8}")
    table = []
    for k in keys:
        b = statistics.median(results["berth"][k])
        d = statistics.median(results["distribution"][k])
        ratio = b / d if d else float("nan")
        table.append({"measure": k, "berth": b, "distribution": d, "ratio": ratio,
                      "berth_runs": results["berth"][k], "distribution_runs": results["distribution"][k]})
        print(f"{k:<48} {b:>12.2f} {d:>14.2f} {ratio:>8.2f}")
    only_berth = [k for k in results["berth"] if k not in results["distribution"]]
    if only_berth:
        print(f"\n{'measured on Berth only':<48} {'berth':>12}")
        for k in only_berth:
            b = statistics.median(results["berth"][k])
            table.append({"measure": k, "berth": b, "berth_runs": results["berth"][k]})
            print(f"{k:<48} {b:>12.2f}")
    if a.out:
        json.dump(table, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
