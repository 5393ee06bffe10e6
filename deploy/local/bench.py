#!/usr/bin/env python3
"""The benchmark of issue 11, in one go, on a stack `up.sh` started (run it through bench.sh).

Phases, in this order, each on its own customer prefix so that its orders can be told apart:

  ceiling-pgbench  pgbench, single-row INSERT + COMMIT, on a scratch database of the same server
  ceiling-echo     ghz, 50 callers, against bench-echo (the order API on the same tonic stack,
                   answering without database or broker)
  closed-50        ghz, 50 callers (closed model, like the original's 50 VUs), CreateOrder
  grpc-1000        bench-load --rate 1000 (open model), CreateOrder
  rest-1000        k6 constant-arrival-rate 1000/s, POST /api/v1/orders
  target           bench-load --rate TARGET (open model) for TARGET_SECONDS

bench-load (bench/src/load.rs) is the project's own open-model generator: ghz spends about
0.3 ms of CPU per call on the two cores it shares with the pipeline and, asked for 5,000/s,
offered about 1,770/s; bench-load spends 0.06-0.15 ms, keeps its schedule and
measures each call's latency from when it was due (no coordinated omission).

After each pipeline phase it waits (bounded) until the phase's orders are decided, then reads the
accepted -> decided latency from the orders database. A sampler reads every second: the CPU time
of each process tree (PostgreSQL, Kafka, the three services, the load generator), each service's
RSS, order's created/decided counters and the consumers' lag from the services' /metrics. It
writes bench-results/<timestamp>/{summary.json,samples.csv,chart.png} and prints every figure
with its target and ratio.

Everything is loopback-only and bounded in count and time. Settings (environment):
  BENCH_TARGET_RATE (5000)  BENCH_TARGET_SECONDS (60)  BENCH_FIXED_RATE (1000)
  BENCH_FIXED_SECONDS (30)  BENCH_CLOSED_ORDERS (20000)  BENCH_CONCURRENCY (50)
  BENCH_PGBENCH_CLIENTS (16)  BENCH_PGBENCH_SECONDS (15)  BENCH_DRAIN_SECONDS (180)
  BENCH_PHASES (all: ceiling-pgbench,ceiling-echo,closed-50,grpc-1000,rest-1000,target)
  BENCH_WARMUP_ORDERS (5000): a closed run first, not measured, so that the broker's JIT
  and the services' pools are warm (a broker just restarted spends a core compiling)
"""

import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone

ENV = os.environ
REPO = ENV["REPO"]
STATE = ENV["SHOP_STATE_DIR"]
PG = f"postgres://shop:shop@127.0.0.1:{ENV['PGPORT']}"
ORDER_GRPC = f"127.0.0.1:{ENV['ORDER_GRPC_PORT']}"
ORDER_HTTP = f"http://127.0.0.1:{ENV['ORDER_HTTP_PORT']}"
INVENTORY_GRPC = f"127.0.0.1:{ENV['INVENTORY_GRPC_PORT']}"
ECHO_GRPC = f"127.0.0.1:{int(ENV.get('BENCH_ECHO_PORT', 50099 + int(ENV.get('SHOP_PORT_OFFSET', 0))))}"
ECHO_BIN = ENV["BENCH_ECHO_BIN"]
LOAD_BIN = ENV["BENCH_LOAD_BIN"]
METRICS = {svc: f"http://127.0.0.1:{ENV[svc.upper() + '_METRICS_PORT']}/metrics"
           for svc in ("order", "payment", "inventory")}
SERVICES = ("order", "payment", "inventory")
TICK = os.sysconf("SC_CLK_TCK")


def setting(name, default):
    return int(ENV.get(name, default))


TARGET_RATE = setting("BENCH_TARGET_RATE", 5000)
TARGET_SECONDS = setting("BENCH_TARGET_SECONDS", 60)
FIXED_RATE = setting("BENCH_FIXED_RATE", 1000)
FIXED_SECONDS = setting("BENCH_FIXED_SECONDS", 30)
CLOSED_ORDERS = setting("BENCH_CLOSED_ORDERS", 20000)
CONCURRENCY = setting("BENCH_CONCURRENCY", 50)
PGBENCH_CLIENTS = setting("BENCH_PGBENCH_CLIENTS", 16)
PGBENCH_SECONDS = setting("BENCH_PGBENCH_SECONDS", 15)
DRAIN_SECONDS = setting("BENCH_DRAIN_SECONDS", 180)
WARMUP_ORDERS = setting("BENCH_WARMUP_ORDERS", 5000)
ALL_PHASES = ["ceiling-pgbench", "ceiling-echo", "closed-50", "grpc-1000", "rest-1000", "target"]
PHASES = [p for p in ENV.get("BENCH_PHASES", ",".join(ALL_PHASES)).split(",") if p]
ORDER_BODY = ('{"customer_id":"%s-{{.RequestNumber}}","items":[{"product_id":"PROD013","quantity":1},'
              '{"product_id":"PROD014","quantity":1}]}')


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


def psql(db, sql):
    out = subprocess.run(["psql", "-qAtX", f"{PG}/{db}", "-c", sql],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


# ---------------------------------------------------------------- processes and the sampler

def pid_file(name):
    try:
        with open(os.path.join(STATE, "pids", f"{name}.pid")) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def postgres_pid():
    try:
        with open(os.path.join(STATE, "postgres", "data", "postmaster.pid")) as f:
            return int(f.readline())
    except (OSError, ValueError):
        return None


def proc_stat(pid):
    """(ppid, cpu seconds of the process, cpu seconds of its reaped children) or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is state (field 3); utime, stime, cutime, cstime are fields 14-17.
    own = sum(int(v) for v in fields[11:13])
    reaped = sum(int(v) for v in fields[13:15])
    return int(fields[1]), own / TICK, reaped / TICK


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def tree_cpu(roots):
    """CPU seconds of every process under `roots` (name -> pid), one /proc scan: each live
    process's own time plus that of its reaped children (exited PostgreSQL backends...). For
    this process ("bench") only the live children count: its own time is the sampler's, and
    its reaped children are added by the caller (getrusage), once."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = proc_stat(int(entry))
            if s:
                stats[int(entry)] = s
    children = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    me = os.getpid()
    for name, root in roots.items():
        total, todo = 0.0, [root] if root in stats else []
        while todo:
            pid = todo.pop()
            if pid != me:
                total += stats[pid][1] + stats[pid][2]
            todo.extend(children.get(pid, []))
        out[name] = total
    if me in stats:
        out["sampler"] = stats[me][1]
    return out


def scrape(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return ""


def metric_sum(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Sampler(threading.Thread):
    """Samples once a second until stopped; `rows` is the time series."""

    def __init__(self, roots):
        super().__init__(daemon=True)
        self.roots = roots
        self.rows = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def sample(self):
        cpu = tree_cpu(self.roots)
        # The load generators are this process's children: live ones by /proc, reaped ones
        # by getrusage. This process's own time (the sampler, psql polls excepted) is kept
        # apart as "sampler": it is the measurement, not the system or its load.
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu["generator"] = cpu.pop("bench", 0.0) + reaped.ru_utime + reaped.ru_stime
        order = scrape(METRICS["order"])
        lag = sum(metric_sum(scrape(METRICS[s]) if s != "order" else order, "shop_consumer_lag")
                  for s in SERVICES)
        row = {
            "t": round(time.monotonic() - self.t0, 2),
            "created": metric_sum(order, "shop_orders_created_total"),
            "decided": metric_sum(order, "shop_orders_decided_total"),
            "lag": lag,
        }
        for name, secs in cpu.items():
            row[f"cpu_{name}"] = round(secs, 3)
        for svc in SERVICES:
            row[f"rss_kib_{svc}"] = status_kib(self.roots.get(svc), "VmRSS") or 0
        self.rows.append(row)
        return row

    def run(self):
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(1.0)

    def now(self):
        return time.monotonic() - self.t0

    def at(self, t):
        """The last sample taken at or before `t` (or the first)."""
        best = self.rows[0]
        for row in self.rows:
            if row["t"] <= t:
                best = row
        return best


# ---------------------------------------------------------------- load generators

def ghz(target, run, extra, label):
    """Runs ghz with the repo's CreateOrder config; returns its JSON report."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        path = out.name
    cmd = ["ghz", "--config", os.path.join(REPO, "ghz/create_order.json"), "--skipFirst", "0",
           "-d", ORDER_BODY % run, "-O", "json", "-o", path, *extra, target]
    log(f"{label}: {' '.join(cmd[5:])}")
    subprocess.run(cmd, check=True)
    with open(path) as f:
        report = json.load(f)
    os.unlink(path)
    return report


def ghz_figures(report, seconds_from):
    lat = {p["percentage"]: p["latency"] / 1e6 for p in report.get("latencyDistribution") or []}
    codes = report.get("statusCodeDistribution") or {}
    by_second = {}
    for d in report.get("details") or []:
        ts = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", d["timestamp"]))
        sec = int(ts.timestamp() - seconds_from)
        by_second.setdefault(sec, []).append(d["latency"] / 1e6)
    per_second = {sec: (pct(v, 0.5), pct(v, 0.99)) for sec, v in by_second.items()}
    return {
        "count": report["count"],
        "ok": codes.get("OK", 0),
        "errors": {k: v for k, v in codes.items() if k != "OK"},
        "rps": round(report["rps"], 1),
        "avg_ms": round(report["average"] / 1e6, 2),
        "p50_ms": round(lat.get(50, 0), 2),
        "p99_ms": round(lat.get(99, 0), 2),
    }, per_second


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def bench_load(run, rate, seconds, seconds_from, label):
    """Runs bench-load (open model) against order; returns its figures and the per-second
    (p50, p99) latency series."""
    cmd = [LOAD_BIN, "--addr", ORDER_GRPC, "--rate", str(rate), "--seconds", str(seconds),
           "--run", run, "--connections", "4"]
    log(f"{label}: {' '.join(cmd[1:])}")
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    report = json.loads(out)
    series = {int(report["start_unix"] - seconds_from + sec): (p50, p99)
              for sec, _n, p50, p99 in report.pop("per_second")}
    report.pop("start_unix")
    return report, series


def k6_rest(run, rate, seconds):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        path = out.name
    cmd = ["k6", "run", "-q", "--summary-export", path,
           "--summary-trend-stats", "avg,p(50),p(95),p(99),max",
           "-e", f"BASE_URL={ORDER_HTTP}", "-e", f"RATE={rate}", "-e", f"DURATION={seconds}s",
           "-e", f"RUN={run}", os.path.join(REPO, "ghz/k6/rest_orders.js")]
    log(f"rest-{rate}: k6 constant-arrival-rate {rate}/s for {seconds}s")
    # k6 exits non-zero when a threshold fails; the figures say why.
    subprocess.run(cmd, check=False)
    with open(path) as f:
        summary = json.load(f)
    os.unlink(path)
    m = summary["metrics"]
    dur = m.get("http_req_duration", {})
    return {
        "count": int(m.get("iterations", {}).get("count", 0)),
        "dropped": int(m.get("dropped_iterations", {}).get("count", 0)),
        "failed_rate": m.get("http_req_failed", {}).get("value", 0),
        "rps": round(m.get("iterations", {}).get("rate", 0), 1),
        "avg_ms": round(dur.get("avg", 0), 2),
        "p50_ms": round(dur.get("p(50)", 0), 2),
        "p99_ms": round(dur.get("p(99)", 0), 2),
    }


# ---------------------------------------------------------------- the pipeline's side

def wait_decided(run, sampler):
    """Waits (bounded) until no order of `run` is PENDING; returns the decided latencies."""
    deadline = time.monotonic() + DRAIN_SECONDS
    query = f"SELECT count(*) FILTER (WHERE status = 'PENDING'), count(*) FROM orders WHERE customer_id LIKE '{run}-%'"
    while True:
        pending, total = (int(v) for v in psql("orders", query).split("|"))
        if pending == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    drained_at = sampler.now()
    row = psql("orders", f"""
        SELECT count(*), count(*) FILTER (WHERE status = 'CONFIRMED'),
               count(*) FILTER (WHERE status = 'PENDING'),
               percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
                 (ORDER BY extract(epoch FROM updated_at - created_at))
                 FILTER (WHERE status = 'CONFIRMED'),
               extract(epoch FROM max(updated_at) - min(created_at))
        FROM orders WHERE customer_id LIKE '{run}-%'""")
    total, confirmed, pending, pcts, span = row.split("|")
    p = [float(x) * 1000 for x in pcts.strip("{}").split(",")] if pcts else [0, 0, 0]
    return {
        "orders": int(total),
        "confirmed": int(confirmed),
        "still_pending": int(pending),
        "decided_p50_ms": round(p[0], 1),
        "decided_p95_ms": round(p[1], 1),
        "decided_p99_ms": round(p[2], 1),
        "created_to_last_decided_s": round(float(span or 0), 2),
        "drained_at": round(drained_at, 1),
    }


def window(sampler, t0, t1):
    """Counters and CPU between two instants of the sampler."""
    a, b = sampler.at(t0), sampler.at(t1)
    secs = max(b["t"] - a["t"], 1e-9)
    cpu = {k[4:]: round(b[k] - a.get(k, 0), 2) for k in b if k.startswith("cpu_")}
    decided = b["decided"] - a["decided"]
    return {
        "seconds": round(secs, 1),
        "accepted": int(b["created"] - a["created"]),
        "decided": int(decided),
        "accepted_per_s": round((b["created"] - a["created"]) / secs, 1),
        "decided_per_s": round(decided / secs, 1),
        "cpu_seconds": cpu,
        "cpu_us_per_decided": round(sum(v for k, v in cpu.items() if k != "sampler")
                                    / decided * 1e6, 1) if decided else None,
    }


def pgbench():
    psql("postgres", "DROP DATABASE IF EXISTS bench_ceiling")
    psql("postgres", "CREATE DATABASE bench_ceiling")
    try:
        psql("bench_ceiling", "CREATE TABLE rows (id bigserial PRIMARY KEY, v int NOT NULL)")
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
            f.write("INSERT INTO rows (v) VALUES (1);\n")
            script = f.name
        log(f"ceiling-pgbench: {PGBENCH_CLIENTS} clients, single-row INSERT + COMMIT, {PGBENCH_SECONDS}s")
        out = subprocess.run(["pgbench", "-n", "-f", script, "-c", str(PGBENCH_CLIENTS), "-j", "2",
                              "-T", str(PGBENCH_SECONDS), f"{PG}/bench_ceiling"],
                             check=True, capture_output=True, text=True).stdout
        os.unlink(script)
        tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
        lat = re.search(r"latency average = ([\d.]+) ms", out)
        return {"tps": round(tps, 1), "avg_ms": float(lat.group(1)) if lat else None}
    finally:
        psql("postgres", "DROP DATABASE IF EXISTS bench_ceiling")


# ---------------------------------------------------------------- report

def ratio(value, target, higher_is_better=True):
    if value is None or not target:
        return None
    return round(value / target if higher_is_better else target / value, 2) if value else None


def chart(path, sampler, phases, latency_series):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no chart (bench.sh installs it in a venv)")
        return False
    rows = sampler.rows
    t = [r["t"] for r in rows]
    rate = lambda key: [0] + [(b[key] - a[key]) / max(b["t"] - a["t"], 1e-9) for a, b in zip(rows, rows[1:])]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(12, 10), sharex=True)
    offered_t, offered = [], []
    for p in phases:
        if p.get("offered_per_s"):
            offered_t += [p["t0"], p["t1"]]
            offered += [p["offered_per_s"]] * 2
            offered_t.append(p["t1"])
            offered.append(float("nan"))
    ax1.plot(offered_t, offered, label="offered", color="grey", linestyle="--")
    ax1.plot(t, rate("created"), label="accepted (created)")
    ax1.plot(t, rate("decided"), label="decided")
    ax1.set_ylabel("orders/s")
    ax1.legend(loc="upper left")
    for name, series in latency_series.items():
        xs = sorted(series)
        if not xs:
            continue
        ax2.plot(xs, [series[x][0] for x in xs], label=f"{name} CreateOrder p50")
        ax2.plot(xs, [series[x][1] for x in xs], label=f"{name} CreateOrder p99")
    ax2.set_yscale("log")
    ax2.set_ylabel("ms")
    ax2.legend(loc="upper left", fontsize="small")
    ax3.plot(t, [r["created"] - r["decided"] for r in rows], label="accepted - decided (backlog)")
    ax3.plot(t, [r["lag"] for r in rows], label="consumer lag, records (librdkafka stats, every 5 s)")
    ax3.set_ylabel("orders / records")
    ax3.set_xlabel("seconds since the benchmark started")
    ax3.legend(loc="upper left")
    for p in phases:
        for ax in (ax1, ax2, ax3):
            ax.axvspan(p["t0"], p["t1"], alpha=0.08, color="C0")
        ax1.annotate(p["name"], (p["t0"], 1), xycoords=("data", "axes fraction"),
                     va="top", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main():
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = os.path.join(REPO, "bench-results", stamp)
    os.makedirs(out_dir, exist_ok=True)
    roots = {"postgres": postgres_pid(), "kafka": pid_file("kafka"), "bench": os.getpid()}
    for svc in SERVICES:
        roots[svc] = pid_file(svc)
    missing = [k for k, v in roots.items() if not v]
    if missing:
        sys.exit(f"error: no pid for {missing} under {STATE}: start the stack with deploy/local/up.sh")
    for product in ("PROD013", "PROD014"):
        subprocess.run(["grpcurl", "-plaintext", "-d",
                        json.dumps({"product_id": product, "available": 1_000_000_000}),
                        INVENTORY_GRPC, "shop.inventory.v1.InventoryService/SetStock"],
                       check=True, capture_output=True)
    if WARMUP_ORDERS:
        warmup = f"bench{stamp}-warmup"
        ghz(ORDER_GRPC, warmup, ["-n", str(WARMUP_ORDERS), "-c", str(CONCURRENCY)], "warm-up")
        deadline = time.monotonic() + DRAIN_SECONDS
        query = f"SELECT count(*) FROM orders WHERE status = 'PENDING' AND customer_id LIKE '{warmup}-%'"
        while psql("orders", query) != "0" and time.monotonic() < deadline:
            time.sleep(1)
    sampler = Sampler(roots)
    sampler.sample()
    sampler.start()
    wall0 = time.time() - sampler.now()
    figures, phases, latency_series = {}, [], {}
    prefix = f"bench{stamp}"

    def pipeline_phase(name, offered, generate):
        t0 = sampler.now()
        run = f"{prefix}-{name}"
        load = generate(run)
        t1 = sampler.now()
        decided = wait_decided(run, sampler)
        phases.append({"name": name, "t0": t0, "t1": t1, "offered_per_s": offered})
        figures[name] = {"load": load, "decided": decided,
                         "during_load": window(sampler, t0, t1),
                         "load_and_drain": window(sampler, t0, decided["drained_at"])}
        log(f"{name}: {json.dumps(figures[name]['load'])}")

    if "ceiling-pgbench" in PHASES:
        t0 = sampler.now()
        figures["ceiling-pgbench"] = pgbench()
        phases.append({"name": "pgbench", "t0": t0, "t1": sampler.now()})
    if "ceiling-echo" in PHASES:
        echo = subprocess.Popen([ECHO_BIN, ECHO_GRPC], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while subprocess.run(["grpc-health-probe", f"-addr={ECHO_GRPC}"],
                                 capture_output=True).returncode != 0:
                if time.monotonic() > deadline:
                    sys.exit("error: bench-echo did not start")
                time.sleep(0.2)
            t0 = sampler.now()
            report = ghz(ECHO_GRPC, f"{prefix}-echo",
                         ["-n", str(CLOSED_ORDERS), "-c", str(CONCURRENCY)], "ceiling-echo")
            figures["ceiling-echo"], _ = ghz_figures(report, wall0)
            phases.append({"name": "echo", "t0": t0, "t1": sampler.now()})
        finally:
            echo.terminate()
            echo.wait()
    if "closed-50" in PHASES:
        def closed(run):
            report = ghz(ORDER_GRPC, run, ["-n", str(CLOSED_ORDERS), "-c", str(CONCURRENCY)],
                         f"closed-{CONCURRENCY}")
            f, series = ghz_figures(report, wall0)
            latency_series["closed"] = series
            return f
        pipeline_phase("closed-50", None, closed)
    if "grpc-1000" in PHASES:
        def fixed_grpc(run):
            f, series = bench_load(run, FIXED_RATE, FIXED_SECONDS, wall0, f"grpc-{FIXED_RATE}")
            latency_series[f"grpc {FIXED_RATE}/s"] = series
            return f
        pipeline_phase("grpc-1000", FIXED_RATE, fixed_grpc)
    if "rest-1000" in PHASES:
        pipeline_phase("rest-1000", FIXED_RATE, lambda run: k6_rest(run, FIXED_RATE, FIXED_SECONDS))
    if "target" in PHASES:
        def target(run):
            f, series = bench_load(run, TARGET_RATE, TARGET_SECONDS, wall0,
                                   f"target {TARGET_RATE}/s")
            latency_series[f"grpc {TARGET_RATE}/s"] = series
            return f
        pipeline_phase("target", TARGET_RATE, target)

    sampler.stop_event.set()
    sampler.join()
    rss_peak = {svc: round((status_kib(roots[svc], "VmHWM") or 0) / 1024, 1) for svc in SERVICES}

    # Every figure of the issue with its target and ratio (>= 1 means met).
    g = lambda *path: _get(figures, path)
    targets = []

    def target_row(what, value, goal, unit, higher=True):
        targets.append({"figure": what, "value": value, "target": goal, "unit": unit,
                        "ratio_to_target": ratio(value, goal, higher),
                        "met": None if value is None else (value >= goal if higher else value <= goal)})

    target_row(f"1. accepted/s at a fixed {TARGET_RATE}/s for {TARGET_SECONDS}s",
               g("target", "during_load", "accepted_per_s"), TARGET_RATE, "orders/s")
    target_row(f"1. decided/s during that run", g("target", "during_load", "decided_per_s"),
               TARGET_RATE, "orders/s")
    target_row(f"2. CreateOrder p99 at {FIXED_RATE}/s, gRPC", g("grpc-1000", "load", "p99_ms"), 5, "ms", False)
    target_row(f"2. CreateOrder p99 at {FIXED_RATE}/s, REST", g("rest-1000", "load", "p99_ms"), 5, "ms", False)
    target_row(f"3. accepted -> decided p99 at {FIXED_RATE}/s (gRPC run)",
               g("grpc-1000", "decided", "decided_p99_ms"), 250, "ms", False)
    closed_rps, echo_rps = g("closed-50", "load", "rps"), g("ceiling-echo", "rps")
    target_row(f"4. CreateOrder/s at {CONCURRENCY} callers / echo/s",
               round(closed_rps / echo_rps, 3) if closed_rps and echo_rps else None, 0.5, "ratio")
    target_row("5. CPU per decided order, all processes (target run incl. drain)",
               g("target", "load_and_drain", "cpu_us_per_decided"), 400, "µs", False)
    for svc in SERVICES:
        target_row(f"5. peak RSS {svc}", rss_peak[svc], 64, "MiB", False)
    decided_rate, tps = g("target", "during_load", "decided_per_s"), g("ceiling-pgbench", "tps")
    target_row("5. decided/s / pgbench INSERT+COMMIT tps",
               round(decided_rate / tps, 3) if decided_rate and tps else None, 0.25, "ratio")

    summary = {"started": stamp, "settings": {
        "target_rate": TARGET_RATE, "target_seconds": TARGET_SECONDS, "fixed_rate": FIXED_RATE,
        "fixed_seconds": FIXED_SECONDS, "closed_orders": CLOSED_ORDERS, "concurrency": CONCURRENCY,
        "pgbench_clients": PGBENCH_CLIENTS, "nproc": os.cpu_count()},
        "phases": phases, "figures": figures, "peak_rss_mib": rss_peak, "targets": targets}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "samples.csv"), "w", newline="") as f:
        keys = sorted({k for r in sampler.rows for k in r}, key=lambda k: (k != "t", k))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(sampler.rows)
    drew = chart(os.path.join(out_dir, "chart.png"), sampler, phases, latency_series)

    print()
    print(f"{'figure':<62} {'value':>10} {'target':>8} {'ratio':>6}  met")
    for t in targets:
        v = "-" if t["value"] is None else f"{t['value']:g}"
        r = "-" if t["ratio_to_target"] is None else f"{t['ratio_to_target']:g}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        print(f"{t['figure']:<62} {v:>10} {t['target']:>6g} {t['unit']:<2} {r:>5}  {met}")
    print()
    for name in ("closed-50", "grpc-1000", "rest-1000", "target"):
        if name in figures:
            f = figures[name]
            print(f"{name:<10} load {json.dumps(f['load'])}")
            print(f"{'':<10} decided {json.dumps(f['decided'])}")
            print(f"{'':<10} cpu s (load+drain) {json.dumps(f['load_and_drain']['cpu_seconds'])}")
    for name in ("ceiling-pgbench", "ceiling-echo"):
        if name in figures:
            print(f"{name:<16} {json.dumps(figures[name])}")
    print(f"\nresults: {out_dir}/summary.json, samples.csv{', chart.png' if drew else ''}")


def _get(d, path):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


if __name__ == "__main__":
    main()
