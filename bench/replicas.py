#!/usr/bin/env python3
"""Berth with PostgreSQL metadata, alone and as replicas, against Berth with SQLite.

Setups, all on this machine with blobs on local disk (so that only the metadata database and
the balancer differ between them):

  sqlite           one Berth, SQLite (the default)
  sqlite+haproxy   the same behind haproxy: what the balancer alone costs
  postgres         one Berth, PostgreSQL (a throwaway server started here, default settings)
  postgres x3      three Berths over that database and one blob directory, behind haproxy

For each, RUNS times: manifest GET by tag and blob HEAD under 32 connections (req/s, p99) and
the push of a 1 GiB layer (MB/s). The ratios are against `sqlite`. Then `cargo bench --bench gc`
on both backends (10,000 garbage blobs among 100,000). Benchmarks are not tests: nothing here
asserts a speed.

Usage: bench/replicas [--runs N] [--quick] [--out FILE]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as b  # noqa: E402  (the helpers of bench/run.py)


def start_postgres(work):
    """A throwaway PostgreSQL in `work` on a free loopback port; its admin URL and a stopper."""
    bins = sorted(d for d in os.listdir("/usr/lib/postgresql") if d.isdigit())
    if not bins:
        sys.exit("PostgreSQL is not installed: apt-get install postgresql")
    pg_bin = f"/usr/lib/postgresql/{bins[-1]}/bin"
    pg_dir = os.path.join(work, "pg")
    os.makedirs(pg_dir)
    as_pg = []
    if os.getuid() == 0:  # initdb refuses root
        shutil.chown(pg_dir, "postgres")
        os.chmod(work, 0o755)
        as_pg = ["runuser", "-u", "postgres", "--"]
    port = b.free_port()
    subprocess.run(as_pg + [f"{pg_bin}/initdb", "-D", f"{pg_dir}/data", "-U", "berth", "-A", "trust",
                            "--no-sync"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(as_pg + [f"{pg_bin}/pg_ctl", "-D", f"{pg_dir}/data", "-l", f"{pg_dir}/server.log", "-w",
                            "-o", f"-h 127.0.0.1 -p {port} -k {pg_dir} -c max_connections=200", "start"],
                   check=True, stdout=subprocess.DEVNULL)

    def stop():
        subprocess.run(as_pg + [f"{pg_bin}/pg_ctl", "-D", f"{pg_dir}/data", "-m", "fast", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    return f"postgres://berth@127.0.0.1:{port}/postgres", stop


def create_database(admin, name):
    subprocess.run(["psql", admin, "-qc", f"CREATE DATABASE {name}"], check=True)
    return admin.rsplit("/", 1)[0] + "/" + name


class Balancer:
    """haproxy, round robin per request over `servers` (Registry objects)."""

    def __init__(self, work, servers):
        self.name = "haproxy"
        self.port = b.free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-haproxy-", dir=work)
        cfg = os.path.join(self.dir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write("global\n  maxconn 4096\n"
                    "defaults\n  mode http\n  timeout connect 2s\n  timeout client 600s\n"
                    "  timeout server 600s\n  option http-keep-alive\n"
                    f"frontend registry\n  bind 127.0.0.1:{self.port}\n  default_backend replicas\n"
                    "backend replicas\n  balance roundrobin\n")
            for i, s in enumerate(servers):
                f.write(f"  server r{i} 127.0.0.1:{s.port}\n")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", cfg], stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.dir, "log"), "ab"))
        b.wait_up(self.port, self.proc, "haproxy")

    def url(self, path=""):
        return path if path.startswith("http") else f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def postgres_config(url, blobs=None):
    root = f'\nroot = "{blobs}"' if blobs else ""
    return (f'[storage]\nbackend = "filesystem"{root}\n\n'
            f'[metadata]\nbackend = "postgres"\nurl = "{url}"\npool_size = 16\n')


def measure(front, runs, load_s, big, digest, record):
    c = b.conn(front)
    cfg = b'{"architecture":"amd64","os":"linux","bench":true}'
    cd = b.push_small(front, "bench/small", cfg)
    b.put_manifest(c, "bench/small", "latest", b.manifest_for(cd, len(cfg)))
    for _ in range(runs):
        rps, _, p99 = b.wrk(front.url("/v2/bench/small/manifests/latest"), load_s)
        record("manifest GET by tag, 32 conns (req/s)", rps)
        record("manifest GET p99 (ms)", p99)
        rps, _, p99 = b.ab_head(front.url(f"/v2/bench/small/blobs/{cd}"), 20000 if load_s < 10 else 100000)
        record("blob HEAD, 32 conns (req/s)", rps)
        record("blob HEAD p99 (ms)", p99)
        record("push 1 GiB monolithic (MB/s)", b.push_monolithic(front, big, digest))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="shorter loads, no GC benchmark")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    a = ap.parse_args()
    load_s = 3 if a.quick else 10
    work = tempfile.mkdtemp(prefix="berth-bench-replicas-")
    os.chmod(work, 0o755)
    big = os.path.join(work, "layer.bin")
    digest, b.SIZE = b.make_layer(big)
    results = {}
    admin, stop_pg = start_postgres(work)
    procs = []

    def recorder(setup):
        def record(key, value):
            results.setdefault(setup, {}).setdefault(key, []).append(value)
            print(f"  {setup:<16} {key:<40} {value:10.2f}", flush=True)
        return record

    def stop_all():
        while procs:
            procs.pop().stop()

    try:
        # One Berth, SQLite; then the same behind haproxy.
        r = b.Registry("berth", work)
        r.start()
        procs.append(r)
        measure(r, a.runs, load_s, big, digest, recorder("sqlite"))
        lb = Balancer(work, [r])
        procs.append(lb)
        measure(lb, a.runs, load_s, big, digest, recorder("sqlite+haproxy"))
        stop_all()
        # One Berth, PostgreSQL.
        r = b.Registry("berth", work, config=postgres_config(create_database(admin, "bench_one")))
        r.start()
        procs.append(r)
        measure(r, a.runs, load_s, big, digest, recorder("postgres"))
        stop_all()
        # Three Berths over one database and one blob directory, behind haproxy.
        url = create_database(admin, "bench_three")
        blobs = os.path.join(work, "shared-blobs")
        replicas = []
        for _ in range(3):
            r = b.Registry("berth", work, config=postgres_config(url, blobs))
            r.args = ["--peer-url", f"http://127.0.0.1:{r.port}"]
            r.start()
            procs.append(r)
            replicas.append(r)
        lb = Balancer(work, replicas)
        procs.append(lb)
        measure(lb, a.runs, load_s, big, digest, recorder("postgres x3"))
        stop_all()
        report(results, a.out)
        if not a.quick:
            print("\ncargo bench --bench gc (SQLite, then PostgreSQL):", flush=True)
            subprocess.run(["cargo", "bench", "--bench", "gc"], cwd=b.ROOT, check=False,
                           env={**os.environ, "BERTH_BENCH_POSTGRES_URL": admin})
    finally:
        stop_all()
        stop_pg()
        shutil.rmtree(work, ignore_errors=True)


def report(results, out):
    base = results["sqlite"]
    print(f"\n{'measure':<40} {'setup':<16} {'median':>10} {'vs sqlite':>10}")
    table = []
    for setup, figures in results.items():
        for k, runs in figures.items():
            m = statistics.median(runs)
            ratio = m / statistics.median(base[k]) if k in base else float("nan")
            table.append({"setup": setup, "measure": k, "median": m, "ratio": ratio, "runs": runs})
            print(f"{k:<40} {setup:<16} {m:>10.2f} {ratio:>10.2f}")
    if out:
        json.dump(table, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
