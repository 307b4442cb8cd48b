#!/usr/bin/env python3
"""Mock of the tracer daemon's HTTP API, for developing the web dashboard.

Serves the dashboard assets from tracer/assets exactly at the paths the daemon
uses (/, /assets/app.js, /assets/style.css, /assets/cytoscape.min.js) and
implements /api/topology, /api/stream, /api/stat, /api/routes, /api/edges,
/api/tap, /api/spans and /api/status with fake but self-consistent data: a
generator thread "observes" requests in real time (rates drift slowly, one
edge returns 5xx now and then, one edge went quiet minutes ago) and every
endpoint is computed from those requests, so numbers agree across views.

With --proxy http://127.0.0.1:9464 it serves the assets from disk and
forwards /api/* to a real daemon instead (event streams included), to work on
the dashboard against live data without rebuilding the daemon.

Standard library only.  Usage:

    python3 scripts/dashboard-mock.py --port 8765
    python3 scripts/dashboard-mock.py --port 8765 --proxy http://127.0.0.1:9464
"""

import argparse
import collections
import json
import math
import os
import queue
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WINDOWS = {"10s": 10.0, "1m": 60.0, "10m": 600.0}
SLOT = 10  # seconds per history point
HISTORY_SLOTS = 60
KEEP_SECONDS = 600 + SLOT  # raw requests kept: the longest window plus one slot

# Workloads on "this host": name -> (pid, listen address or None for clients).
LOCAL = {
    "curl": (4101, None),
    "wrk": (4102, None),
    "cron": (4103, None),
    "frontend": (2210, "10.0.0.2:8080"),
    "backend": (2230, "10.0.0.2:9000"),
    "auth": (2250, "10.0.0.2:9100"),
    "nginx": (1880, "10.0.0.2:80"),
}
EXTERNAL = "10.0.0.5:80"  # a server not on this host: shown by address
OTHER = "[other]"  # clients the tracer could not attribute

# Entry flows: (src, dst, method, route, path generator, base rps, children).
# A child is (dst, method, route, path generator, probability).
def _user_path():
    return "/users/%d" % random.randint(1, 5000)


def _api_user_path():
    return "/api/users/%d" % random.randint(1, 5000)


def _static_path():
    return "/static/%s" % random.choice(["app.js", "app.css", "logo.svg", "font.woff2"])


FLOWS = [
    ("curl", "frontend", "GET", "/users/{id}", _user_path, 6.0, [
        ("auth", "POST", "/verify", lambda: "/verify", 1.0),
        ("backend", "GET", "/api/users/{id}", _api_user_path, 1.0),
    ]),
    ("curl", "frontend", "GET", "/health", lambda: "/health", 1.0, []),
    ("curl", "frontend", "POST", "/orders", lambda: "/orders", 1.5, [
        ("auth", "POST", "/verify", lambda: "/verify", 1.0),
        ("backend", "POST", "/api/orders", lambda: "/api/orders", 1.0),
    ]),
    ("wrk", "nginx", "GET", "/static/{file}", _static_path, 18.0, []),
    ("wrk", "nginx", "GET", "/", lambda: "/", 4.0, []),
    ("curl", "nginx", "GET", "/", lambda: "/", 0.5, []),
    (OTHER, "nginx", "GET", "[other]", lambda: "/wp-login.php", 0.2, []),
]
# backend calls the external cache for most requests it serves.
BACKEND_CHILD = (EXTERNAL, "GET", "/cache/{key}", lambda: "/cache/u%d" % random.randint(1, 999), 0.8)

# Per-server latency (median ms, spread) and failure probability.
SERVER_PROFILE = {
    "frontend": (6.0, 0.5, 0.001),
    "backend": (4.0, 0.6, 0.006),
    "auth": (2.5, 0.8, 0.07),  # the unhealthy one: ~7 % 503s
    "nginx": (0.6, 0.4, 0.0),
    EXTERNAL: (1.5, 0.5, 0.0),
}


def rand_hex(n):
    return "%0*x" % (n, random.getrandbits(n * 4))


class Store:
    """Requests observed so far, plus spans by trace, under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.deque()  # dicts, in completion order
        self.totals = collections.Counter()  # (src, dst) -> requests since start
        self.total_fail = collections.Counter()
        self.total_codes = collections.defaultdict(collections.Counter)
        self.route_totals = collections.Counter()  # (dst, method, route)
        self.bytes = collections.defaultdict(lambda: [0, 0])
        self.spans = collections.OrderedDict()  # trace_id -> [span]
        self.subscribers = []  # tap queues
        self.started = time.time()

    def add(self, reqs, spans, live):
        with self.lock:
            for r in reqs:
                self.requests.append(r)
                key = (r["src"], r["dst"])
                self.totals[key] += 1
                self.total_fail[key] += r["status"] >= 500
                self.total_codes[key][str(r["status"])] += 1
                self.route_totals[(r["dst"], r["method"], r["route"])] += 1
                self.bytes[key][0] += r["req_bytes"]
                self.bytes[key][1] += r["resp_bytes"]
            for s in spans:
                self.spans.setdefault(s["trace_id"], []).append(s)
            while len(self.spans) > 2000:
                self.spans.popitem(last=False)
            cutoff = time.time() - KEEP_SECONDS
            while self.requests and self.requests[0]["end"] < cutoff:
                self.requests.popleft()
            subs = list(self.subscribers) if live else []
        for sub in subs:
            for r in reqs:
                sub.offer(r)

    def snapshot(self):
        with self.lock:
            return list(self.requests)


class TapSubscriber:
    """A bounded queue per tap client; overflow is counted, then reported."""

    def __init__(self, filters):
        self.filters = filters
        self.q = queue.Queue(maxsize=2000)
        self.dropped = 0

    def offer(self, r):
        f = self.filters
        if f.get("to") and r["dst"] != f["to"]:
            return
        if f.get("from") and r["src"] != f["from"]:
            return
        if f.get("path") and not r["path"].startswith(f["path"]):
            return
        if f.get("method") and r["method"].upper() != f["method"].upper():
            return
        try:
            self.q.put_nowait(r)
        except queue.Full:
            self.dropped += 1


STORE = Store()


def latency_for(dst):
    med, spread, _ = SERVER_PROFILE.get(dst, (3.0, 0.5, 0.0))
    # Log-normal with a rare slow tail, so p99 differs visibly from p50.
    ms = random.lognormvariate(math.log(med), spread)
    if random.random() < 0.01:
        ms *= random.uniform(5, 15)
    return ms


def make_request(src, dst, method, route, path, start, trace_id, parent_span):
    """One request, its children (already simulated), and its spans."""
    reqs, spans = [], []
    client_span = rand_hex(16)
    server_span = rand_hex(16)
    t = start + 0.0002  # server start: a little after the client's send
    children = []
    if dst == "frontend":
        for flow in FLOWS:
            if flow[0] == src and flow[1] == dst and flow[3] == route:
                children = flow[6]
    if dst == "backend" and random.random() < BACKEND_CHILD[4]:
        children = [BACKEND_CHILD]
    for (cdst, cmethod, croute, cpath, prob) in children:
        if random.random() > prob:
            continue
        t += random.uniform(0.0002, 0.001)
        creqs, cspans, cend = make_request(dst, cdst, cmethod, croute, cpath(), t,
                                           trace_id, server_span if dst in LOCAL else client_span)
        reqs += creqs
        spans += cspans
        t = cend
    own = latency_for(dst) / 1000.0
    server_end = t + own
    fail_p = SERVER_PROFILE.get(dst, (0, 0, 0.0))[2]
    status = 200
    if random.random() < fail_p:
        status = random.choice([500, 503, 503])
    elif random.random() < 0.02:
        status = random.choice([404, 304, 201])
    end = server_end + 0.0002
    local_dst = dst in LOCAL
    server_latency = (server_end - start - 0.0002) * 1000.0
    client_latency = (end - start) * 1000.0
    src_pid = LOCAL.get(src, (None,))[0]
    dst_pid = LOCAL[dst][0] if local_dst else None
    dst_addr = LOCAL[dst][1] if local_dst else dst
    r = {
        "start": start, "end": end, "src": src, "dst": dst,
        "src_addr": "10.0.0.2:%d" % random.randint(32768, 60999) if src != OTHER
                    else "192.0.2.%d:%d" % (random.randint(2, 250), random.randint(32768, 60999)),
        "dst_addr": dst_addr, "method": method, "path": path, "route": route,
        "status": status,
        # The server side is what the tracer prefers when it sees both ends.
        "latency_ms": server_latency if local_dst else client_latency,
        "server_latency": server_latency if local_dst else None,
        "client_latency": client_latency if src != OTHER else None,
        "observer": "server" if local_dst else "client",
        "trace_id": trace_id,
        "span_id": server_span if local_dst else client_span,
        "src_pid": src_pid, "dst_pid": dst_pid,
        "req_bytes": random.randint(80, 400) + (300 if method == "POST" else 0),
        "resp_bytes": random.randint(200, 8000),
    }
    reqs.append(r)

    def span(kind, sid, parent, service, pid, s, e):
        return {
            "trace_id": trace_id, "span_id": sid, "parent_span_id": parent,
            "kind": kind, "name": "%s %s" % (method, route), "service": service,
            "pid": pid, "start_unix_nano": int(s * 1e9), "duration_ms": (e - s) * 1000.0,
            "status_code": status, "error": status >= 500, "sampled": True,
            "server": dst_addr, "client": r["src_addr"],
        }

    if trace_id:
        if src in LOCAL:
            spans.append(span("CLIENT", client_span, parent_span, src, src_pid, start, end))
        if local_dst:
            parent = client_span if src in LOCAL else parent_span
            spans.append(span("SERVER", server_span, parent, dst, dst_pid, start + 0.0002, server_end))
    return reqs, spans, end


def rate_factor(t, phase):
    """Slow drift so that graphs move: +-35 % over a few minutes, plus noise."""
    return max(0.05, 1.0 + 0.35 * math.sin(t / 90.0 + phase) + random.uniform(-0.1, 0.1))


def simulate(t0, t1, live):
    """Generate all entry requests starting in [t0, t1) and store them."""
    reqs, spans = [], []
    for i, (src, dst, method, route, pathgen, rps, _) in enumerate(FLOWS):
        n = rps * rate_factor(t0, i) * (t1 - t0)
        count = int(n) + (random.random() < n - int(n))
        for _ in range(count):
            start = random.uniform(t0, t1)
            # Like a real tracer, only requests carrying traceparent get a trace.
            trace_id = rand_hex(32) if src == "curl" else None
            r, s, _ = make_request(src, dst, method, route, pathgen(), start, trace_id, None)
            reqs += r
            spans += s
    # cron called backend for a while, long ago: a grey edge in short windows.
    if t0 < STORE.started - 300 and random.random() < 0.5 * (t1 - t0):
        r, s, _ = make_request("cron", "backend", "POST", "/api/jobs/{id}/run",
                               "/api/jobs/%d/run" % random.randint(1, 40), t0, None, None)
        reqs += r
    reqs.sort(key=lambda r: r["end"])
    STORE.add(reqs, spans, live)


def generator():
    last = time.time()
    while True:
        time.sleep(0.1)
        now = time.time()
        simulate(last, now, live=True)
        last = now


def prefill():
    """Invent the last ten minutes so that sparklines have history at once."""
    now = time.time()
    t = now - 600
    while t < now:
        simulate(t, min(t + 1, now), live=False)
        t += 1


# ---- aggregation -----------------------------------------------------------

def quantiles(lat):
    if not lat:
        return None
    lat = sorted(lat)

    def q(p):
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3)

    return {"count": len(lat), "p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99),
            "max_ms": round(lat[-1], 3)}


def window_stats(reqs, seconds):
    n = len(reqs)
    fails = sum(1 for r in reqs if r["status"] >= 500)
    return {
        "requests": n, "failures": fails,
        "success_rate": 1.0 if n == 0 else (n - fails) / n,
        "rps": n / seconds,
        "latency": quantiles([r["latency_ms"] for r in reqs]),
    }


def history(reqs, now):
    slots = collections.defaultdict(list)
    first = (int(now) // SLOT) * SLOT - SLOT * (HISTORY_SLOTS - 1)
    for r in reqs:
        s = (int(r["end"]) // SLOT) * SLOT
        if s >= first:
            slots[s].append(r)
    points = []
    for i in range(HISTORY_SLOTS):
        t = first + i * SLOT
        rs = slots.get(t, [])
        n = len(rs)
        fails = sum(1 for r in rs if r["status"] >= 500)
        q = quantiles([r["latency_ms"] for r in rs])
        # Like the daemon: the current slot's rate is over its elapsed part only.
        elapsed = min(SLOT, max(1.0, now - t))
        points.append({
            "t": t, "requests": n, "failures": fails, "rps": n / elapsed,
            "success_rate": 1.0 if n == 0 else (n - fails) / n,
            "p50_ms": q["p50_ms"] if q else None, "p99_ms": q["p99_ms"] if q else None,
        })
    # Like the daemon: no points before the first traffic of this series.
    while points and points[0]["requests"] == 0:
        points.pop(0)
    return points


def in_window(reqs, now, seconds):
    return [r for r in reqs if r["end"] >= now - seconds]


def group(reqs, key):
    out = collections.defaultdict(list)
    for r in reqs:
        out[key(r)].append(r)
    return out


def topology(window):
    secs = WINDOWS[window]
    now = time.time()
    reqs = STORE.snapshot()
    by_edge = group(reqs, lambda r: (r["src"], r["dst"]))
    # Edges stay once seen (the daemon keeps totals since start), even when
    # their requests have aged out of the ten minutes kept here.
    keys = sorted(set(STORE.totals))
    names = sorted({n for k in keys for n in k})
    by_dst = group(reqs, lambda r: r["dst"])
    by_src = group(reqs, lambda r: r["src"])
    nodes = []
    for name in names:
        inb, outb = by_dst.get(name, []), by_src.get(name, [])
        serves = any(k[1] == name for k in keys)
        calls = any(k[0] == name for k in keys)
        nodes.append({
            "name": name,
            "inbound": window_stats(in_window(inb, now, secs), secs) if serves else None,
            "outbound": window_stats(in_window(outb, now, secs), secs) if calls else None,
            "history": history(inb, now),
        })
    edges = []
    for (src, dst) in keys:
        rs = by_edge.get((src, dst), [])
        edges.append({
            "src": src, "dst": dst,
            "window": window_stats(in_window(rs, now, secs), secs),
            "requests": STORE.totals[(src, dst)],
            "dst_addrs": sorted({r["dst_addr"] for r in rs}),
            "history": history(rs, now),
        })
    return {"window": window, "window_seconds": secs, "nodes": nodes, "edges": edges}


def stat(window):
    secs = WINDOWS[window]
    now = time.time()
    reqs = [r for r in STORE.snapshot() if r["dst"] in LOCAL]
    out = []
    for name, rs in sorted(group(reqs, lambda r: r["dst"]).items()):
        keys = [k for k in STORE.totals if k[1] == name]
        total = sum(STORE.totals[k] for k in keys)
        fails = sum(STORE.total_fail[k] for k in keys)
        codes = collections.Counter()
        for k in keys:
            codes.update(STORE.total_codes[k])
        w = window_stats(in_window(rs, now, secs), secs)
        out.append({
            "name": name, "requests": total, "failures": fails,
            "success_rate": 1.0 if total == 0 else (total - fails) / total,
            "rps": w["rps"], "status_codes": dict(codes), "latency": w["latency"],
            "window": w, "history": history(rs, now),
        })
    return {"window": window, "window_seconds": secs, "workloads": out}


def routes(workload, window):
    secs = WINDOWS[window]
    now = time.time()
    reqs = [r for r in STORE.snapshot() if r["dst"] == workload]
    known = {k[1] for k in STORE.totals}
    if workload not in known:
        return None
    out = []
    for (route, method), rs in sorted(group(reqs, lambda r: (r["route"], r["method"])).items()):
        out.append({
            "route": route, "method": method,
            "requests": STORE.route_totals[(workload, method, route)],
            "window": window_stats(in_window(rs, now, secs), secs),
            "history": history(rs, now),
        })
    return {"window": window, "window_seconds": secs, "workload": workload, "routes": out}


def edges(window):
    secs = WINDOWS[window]
    now = time.time()
    out = []
    by_edge = group(STORE.snapshot(), lambda r: (r["src"], r["dst"]))
    for key in sorted(set(STORE.totals)):
        src, dst = key
        rs = by_edge.get(key, [])
        total, fails = STORE.totals[key], STORE.total_fail[key]
        w = window_stats(in_window(rs, now, secs), secs)
        out.append({
            "src": src, "dst": dst,
            "dst_addrs": sorted({r["dst_addr"] for r in rs}),
            "src_pids": sorted({r["src_pid"] for r in rs if r["src_pid"]}),
            "dst_pids": sorted({r["dst_pid"] for r in rs if r["dst_pid"]}),
            "requests": total, "failures": fails,
            "success_rate": 1.0 if total == 0 else (total - fails) / total,
            "rps": w["rps"], "status_codes": dict(STORE.total_codes[key]),
            "request_bytes": STORE.bytes[key][0], "response_bytes": STORE.bytes[key][1],
            "server_latency": quantiles([r["server_latency"] for r in rs if r["server_latency"] is not None]),
            "client_latency": quantiles([r["client_latency"] for r in rs if r["client_latency"] is not None]),
            "window": w, "history": history(rs, now),
        })
    return {"window": window, "window_seconds": secs, "edges": out}


def spans(trace_id, limit):
    with STORE.lock:
        if trace_id:
            out = list(STORE.spans.get(trace_id, []))
        else:
            out = [s for ss in reversed(STORE.spans.values()) for s in ss]
    out.sort(key=lambda s: s["start_unix_nano"])
    return {"spans": out[:limit]}


def tap_event(r):
    keys = ("src", "dst", "src_addr", "dst_addr", "method", "path", "route", "status",
            "latency_ms", "observer", "trace_id", "span_id")
    ev = {k: r[k] for k in keys}
    ev["ts_ms"] = r["end"] * 1000.0
    ev["latency_ms"] = round(ev["latency_ms"], 3)
    return ev


# ---- HTTP ------------------------------------------------------------------

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


class Handler(BaseHTTPRequestHandler):
    server_version = "tracer-mock"
    assets = None
    proxy = None  # base URL of a real daemon, or None to serve fake data

    def log_message(self, fmt, *args):
        if os.environ.get("MOCK_VERBOSE"):
            super().log_message(fmt, *args)

    def send_json(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def send_file(self, rel):
        path = os.path.join(self.assets, rel)
        try:
            with open(path, "rb") as f:
                body = f.read()
        except OSError:
            return self.send_json({"error": "not found"}, 404)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPES[os.path.splitext(rel)[1]])
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(body)

    def start_sse(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def sse(self, event, data):
        self.wfile.write(("event: %s\ndata: %s\n\n" % (event, json.dumps(data))).encode())
        self.wfile.flush()

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        qs = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        window = qs.get("window", "1m")
        p = url.path
        static = {
            "/": "index.html",
            "/assets/app.js": "app.js",
            "/assets/style.css": "style.css",
            "/assets/cytoscape.min.js": "vendor/cytoscape.min.js",
            "/assets/LICENSE-cytoscape": "vendor/LICENSE-cytoscape",
        }
        try:
            if p in static:
                return self.send_file(static[p])
            if self.proxy and p.startswith("/api/"):
                return self.forward()
            if p.startswith("/api/") and p not in ("/api/tap", "/api/spans", "/api/status") \
                    and window not in WINDOWS:
                return self.send_json({"error": "window must be one of 10s, 1m, 10m"}, 400)
            if p == "/api/topology":
                return self.send_json(topology(window))
            if p == "/api/stat":
                return self.send_json(stat(window))
            if p == "/api/edges":
                return self.send_json(edges(window))
            if p == "/api/routes":
                res = routes(qs.get("workload", ""), window)
                if res is None:
                    return self.send_json({"error": "unknown workload %r" % qs.get("workload", "")}, 404)
                return self.send_json(res)
            if p == "/api/spans":
                return self.send_json(spans(qs.get("trace_id"), int(qs.get("limit", "500"))))
            if p == "/api/status":
                return self.send_json({"ready": True, "uptime_seconds": time.time() - STORE.started,
                                       "programs": 9, "version": "0.1.0-mock"})
            if p == "/api/stream":
                self.start_sse()
                while True:
                    self.sse("snapshot", topology(window))
                    time.sleep(2)
            if p == "/api/tap":
                return self.tap(qs)
            return self.send_json({"error": "not found"}, 404)
        except (BrokenPipeError, ConnectionResetError):
            return

    def forward(self):
        """Relay one API request to the real daemon, streaming the body through
        line by line so that server-sent events arrive as they are sent."""
        try:
            up = urllib.request.urlopen(self.proxy.rstrip("/") + self.path, timeout=3600)
        except urllib.error.HTTPError as e:
            up = e
        except OSError as e:
            return self.send_json({"error": "daemon not reachable: %s" % e}, 502)
        with up:
            self.send_response(up.status)
            for k in ("Content-Type", "Cache-Control"):
                if up.headers.get(k):
                    self.send_header(k, up.headers[k])
            self.end_headers()
            for line in iter(up.readline, b""):
                self.wfile.write(line)
                self.wfile.flush()

    def tap(self, qs):
        sub = TapSubscriber(qs)
        with STORE.lock:
            STORE.subscribers.append(sub)
        try:
            self.start_sse()
            reported = 0
            while True:
                try:
                    r = sub.q.get(timeout=5)
                    self.sse("request", tap_event(r))
                except queue.Empty:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                if sub.dropped != reported:
                    self.sse("dropped", {"dropped": sub.dropped - reported})
                    reported = sub.dropped
        finally:
            with STORE.lock:
                STORE.subscribers.remove(sub)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--assets", default=os.path.join(here, "..", "tracer", "assets"))
    ap.add_argument("--seed", type=int, default=None, help="random seed, for repeatable data")
    ap.add_argument("--proxy", metavar="URL", help="forward /api/* to a real daemon at URL instead of faking it")
    args = ap.parse_args()
    if args.seed is not None:
        random.seed(args.seed)
    Handler.assets = os.path.abspath(args.assets)
    Handler.proxy = args.proxy
    if not args.proxy:
        prefill()
        threading.Thread(target=generator, daemon=True).start()
    srv = ThreadingHTTPServer((args.host, args.port), Handler)
    srv.daemon_threads = True
    print("dashboard mock on http://%s:%d/" % (args.host, args.port), flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
