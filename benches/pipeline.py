#!/usr/bin/env python3
"""Load benchmarks of the whole lorastream pipeline (not timed tests).

UDP (simulated packet forwarder) -> MIC/decrypt -> store (redb, or sled in a build with
`--features sled`) -> MQTT (local mosquitto).
Uses the release binary, its own mosquitto on a free port, a temporary store (under $TMPDIR: put
it on the disk you want to measure, not on a tmpfs), and reads the daemon's /health plus
/proc/<pid>/{stat,status,io} and /proc/net/snmp. Standard library and mosquitto_sub only.

  cargo build --release --locked
  python3 benches/pipeline.py throughput --rate 10000 --seconds 30 --devices 1000 [--format xml]
      [--subscriber]                    (a consumer on the broker's uplink topics)
      [--codec cayennelpp|javascript]   (the application's payload codec; the uplinks then
                                         carry a frame that codec decodes)
      [--storage cache_bytes=2097152]   (any more [storage] settings; repeatable, every scenario)
      [--workers 2]                     (the daemon's [runtime] worker_threads; every scenario)
  python3 benches/pipeline.py drain --count 1000000 --backend redb
  python3 benches/pipeline.py writes --flush-ms 100 --rate 1000 --count 20000 --backend redb [--broker-down]
  python3 benches/pipeline.py latency --flush-ms 100 --rate 200 --count 2000 --backend redb
  python3 benches/pipeline.py callgrind --rate 200 --count 2000 [--format chirpstack] [--out-dir /tmp]
  python3 benches/pipeline.py soak --rate 500 --seconds 1800 --outage-every 240 --outage 60
  python3 benches/pipeline.py idle --seconds 30

Results are printed as one JSON object per run; docs/benchmarks.md records them.
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

BIN = os.environ.get("LORASTREAM_BIN", "target/release/lorastream")
TICK = os.sysconf("SC_CLK_TCK")


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


# `--codec`: the application's codec lines, and the payload and FPort the simulated devices send
# (a CayenneLPP frame of two temperatures and a humidity; an 11-byte frame of
# tests/data/codecs/th-sensor.js on FPort 2).
CODEC = "none"
# `--storage KEY=VALUE`: more `[storage]` lines (e.g. `cache_bytes=2097152`).
STORAGE = []
# `--workers N`: `[runtime] worker_threads` (absent: the daemon's default).
RUNTIME = []
CODEC_PAYLOAD = {"cayennelpp": ("03670110056700ff066850", 1), "javascript": ("cbb8086601c70107530001", 2)}


def codec_lines():
    if CODEC == "none":
        return []
    lines = [f'codec = "{CODEC}"']
    if CODEC == "javascript":
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "codecs", "th-sensor.js")
        lines.append(f'codec_script = "{os.path.abspath(script)}"')
    return lines


def sim_payload_args():
    if CODEC == "none":
        return []
    payload, port = CODEC_PAYLOAD[CODEC]
    return ["--payload", payload, "--f-port", str(port)]


def format_lines(work, fmt):
    """The stream's `format` keys; a template stream renders docs/templates/thingsboard.j2."""
    if fmt == "template":
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "templates", "thingsboard.j2")
        dst = os.path.join(work, "thingsboard.j2")
        shutil.copy(src, dst)
        return ['format = "template"', f'template_file = "{dst}"', 'content_type = "application/json"']
    return [f'format = "{fmt}"']


def config(work, devices, udp, metrics, mqtt_port, flush_ms, backend="redb", dedup_ms=200, fmt="tts"):
    lines = [
        "[gateway]", f'listen = "127.0.0.1:{udp}"', f"dedup_window_ms = {dedup_ms}", "",
        "[storage]", f'path = "{work}/db"', f"flush_every_ms = {flush_ms}", f'backend = "{backend}"',
        "max_bytes = 2147483648", *STORAGE, "",
        "[metrics]", f'listen = "127.0.0.1:{metrics}"', "",
        "[log]", 'level = "warn"', "",
        *(["[runtime]", *RUNTIME, ""] if RUNTIME else []),
        "[[application]]", 'id = "bench"', *codec_lines(), "",
        "[[stream]]", 'name = "cloud"', 'kind = "mqtt"', f'server = "mqtt://127.0.0.1:{mqtt_port}"',
        "inflight = 200", *format_lines(work, fmt), "",
    ]
    for i in range(devices):
        n = i + 1
        lines += [
            "[[device]]", 'application = "bench"', f'id = "d{n}"',
            f'dev_eui = "70B3D57E{n:08X}"', f'dev_addr = "{0x26000000 + n:08X}"',
            f'nwk_s_key = "{n:032X}"', f'app_s_key = "{(n << 64) | 0xABCD:032X}"', "",
        ]
    path = os.path.join(work, "bench.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


class Mosquitto:
    def __init__(self, work, port):
        self.port = port
        self.conf = os.path.join(work, "mosquitto.conf")
        with open(self.conf, "w") as f:
            f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(["mosquitto", "-c", self.conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_tcp(self.port)

    def stop(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def wait_tcp(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def health(port):
    # 200 when ok, 503 when degraded (e.g. no forwarder yet): the same JSON document either way.
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        if e.code != 503:
            raise
        try:
            return json.loads(e.read())
        finally:
            e.close()


def proc_stats(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    cpu = (int(parts[11]) + int(parts[12])) / TICK  # utime + stime, seconds
    sys_cpu = int(parts[12]) / TICK  # stime: the kernel's share (syscalls, wake-ups)
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            status[k] = v.strip()
    io = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            io[k] = int(v)
    kb = lambda k: int(status.get(k, "0 kB").split()[0])
    # write_bytes: page-cache pages this process dirtied (what may reach the disk);
    # cancelled_write_bytes: of those, dropped before writeback (files deleted or truncated).
    return {"cpu_s": cpu, "sys_s": sys_cpu, "rss_kb": kb("VmRSS"), "hwm_kb": kb("VmHWM"),
            "anon_kb": kb("RssAnon"), "file_kb": kb("RssFile"), "write_bytes": io["write_bytes"],
            "cancelled_write_bytes": io["cancelled_write_bytes"]}


class RssSampler:
    """The largest RssAnon (heap, stacks: the daemon's own memory) and RssFile (mapped code and
    read-only data of the binary and libc: clean pages the kernel can drop and read again) seen
    while it runs, sampled every 50 ms. VmHWM is their exact combined peak; these say which
    part it was."""

    def __init__(self, pid):
        self.pid, self.anon_kb, self.file_kb = pid, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                st = proc_stats(self.pid)
            except (OSError, ValueError):
                return
            self.anon_kb, self.file_kb = max(self.anon_kb, st["anon_kb"]), max(self.file_kb, st["file_kb"])
            self._stop.wait(0.05)

    def stop(self):
        self._stop.set()
        self._t.join()
        return {"peak_anon_mb": round(self.anon_kb / 1024, 1), "peak_file_mb": round(self.file_kb / 1024, 1)}


def udp_rcvbuf_errors():
    with open("/proc/net/snmp") as f:
        rows = [l.split() for l in f if l.startswith("Udp:")]
    return int(dict(zip(rows[0], rows[1]))["RcvbufErrors"])


class Daemon:
    def __init__(self, cfg, metrics_port, wrap=None):
        # LORASTREAM_BENCH_WRAP: a command to run the daemon under in any scenario (benches/hot_text.py
        # runs the throughput scenario under callgrind with it).
        wrap = wrap or shlex.split(os.environ.get("LORASTREAM_BENCH_WRAP", ""))
        cmd = wrap + [BIN, "run", "-c", cfg]
        # The daemon's log goes to a file beside the config (a pipe nobody reads could fill up
        # and block the daemon).
        self.log = open(os.path.join(os.path.dirname(cfg), "daemon.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log)
        self.metrics = metrics_port
        wait_tcp(metrics_port, timeout=120)

    def stats(self):
        return proc_stats(self.proc.pid)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def simulate(cfg, rate, count, udp):
    out = subprocess.run([BIN, "simulate", "-c", cfg, "--target", f"127.0.0.1:{udp}", "--rate", str(rate),
                          "--count", str(count), *sim_payload_args()], capture_output=True, text=True, check=True)
    # The last line is the summary; the lines before it are the downlinks it got.
    lines = out.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def queue(h):
    return h["streams"][0]


class Sub:
    """mosquitto_sub on the uplink topics: payload sizes and arrival times."""

    def __init__(self, port, out):
        self.out = out
        self.f = open(out, "w")
        self.proc = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-q", "1", "-t", "lorastream/+/devices/+/up",
                                      "-F", "%U %l %p"], stdout=self.f, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def lines(self):
        self.f.flush()
        with open(self.out) as f:
            return [l.split(" ", 2) for l in f if l.count(" ") >= 2]

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        self.f.close()


def mean_json_size(sub):
    sizes = [int(l[1]) for l in sub.lines()]
    return round(sum(sizes) / max(len(sizes), 1))


def setup(args, flush_ms=100, broker_up=True, dedup_ms=200):
    work = tempfile.mkdtemp(prefix="lorastream-bench-")
    udp, metrics, mqtt = free_port(socket.SOCK_DGRAM), free_port(), free_port()
    cfg = config(work, args.devices, udp, metrics, mqtt, flush_ms, args.backend, dedup_ms, args.format)
    m = Mosquitto(work, mqtt)
    if broker_up:
        m.start()
    return work, cfg, udp, metrics, m


def until(pred, timeout, step=0.1):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def consumer(port):
    """A subscriber that takes every uplink at QoS 1 and throws it away (`--subscriber`): the
    broker then delivers as well as receives, as with an application attached."""
    p = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-q", "1", "-t", "lorastream/+/devices/+/up", "-F", "%l"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return p


def throughput(args):
    work, cfg, udp, metrics, m = setup(args)
    d = Daemon(cfg, metrics)
    sub = consumer(m.port) if args.subscriber else None
    try:
        count = int(args.rate * args.seconds)
        before, drops0, t0 = d.stats(), udp_rcvbuf_errors(), time.time()
        rss = RssSampler(d.proc.pid)
        sim = simulate(cfg, args.rate, count, udp)
        until(lambda: queue(health(metrics))["delivered"] >= count, 60)
        elapsed, after, drops1 = time.time() - t0, d.stats(), udp_rcvbuf_errors()
        parts = rss.stop()
        h = health(metrics)
        accepted, delivered = h["uplinks"]["accepted"], queue(h)["delivered"]
        return {
            "scenario": "throughput", "format": args.format, "codec": CODEC, "rate": args.rate, "seconds": args.seconds, "devices": args.devices,
            "sent": count, "accepted": accepted, "delivered_to_mosquitto": delivered,
            "lost": count - delivered, "udp_rcvbuf_errors": drops1 - drops0,
            "cpu_s_per_1000": round((after["cpu_s"] - before["cpu_s"]) / max(accepted, 1) * 1000, 4),
            "sys_s_per_1000": round((after["sys_s"] - before["sys_s"]) / max(accepted, 1) * 1000, 4),
            "peak_rss_mb": round(after["hwm_kb"] / 1024, 1), **parts, "wall_s": round(elapsed, 1), "simulate": sim,
            "subscriber": bool(sub), "loadavg_1m": round(os.getloadavg()[0], 2),
            # Uplink received → its downlink (the new devices' MAC commands) handed to the
            # forwarder, the longest of the run (the dedup window included; RX1 is 1 s).
            "downlink_schedule_max_ms": round(h["downlink_schedule_latency_us"]["max"] / 1000, 1),
        }
    finally:
        if sub:
            sub.terminate()
            sub.wait()
        d.stop()
        m.stop()
        shutil.rmtree(work, ignore_errors=True)


def drain(args):
    work, cfg, udp, metrics, m = setup(args, broker_up=False)
    d = Daemon(cfg, metrics)
    try:
        t0 = time.time()
        # Queue in chunks so PUSH_ACK counting in simulate stays cheap; fcnt continues.
        sent, chunk = 0, 200_000
        while sent < args.count:
            n = min(chunk, args.count - sent)
            subprocess.run([BIN, "simulate", "-c", cfg, "--target", f"127.0.0.1:{udp}", "--rate", str(args.rate),
                            "--count", str(n), "--fcnt-start", str(sent // args.devices), *sim_payload_args()],
                           capture_output=True, check=True)
            sent += n
        # Until the queue stops growing (UDP can drop datagrams if the daemon falls behind the
        # simulator: those are reported as sent - accepted, not waited for).
        last = [-1]

        def settled():
            depth = queue(health(metrics))["depth"]
            done = depth == last[0]
            last[0] = depth
            return done

        until(settled, 600, 3)
        fill_s = time.time() - t0
        h = health(metrics)
        queued = queue(h)
        st = d.stats()
        rss = RssSampler(d.proc.pid)
        m.start()
        # The stream reconnects after its backoff (up to 60 s after a long outage): time the
        # drain from the first delivery, not from the broker's start.
        until(lambda: queue(health(metrics))["delivered"] > 0, 120, 0.05)
        t1 = time.time()
        first = queue(health(metrics))["delivered"]
        until(lambda: queue(health(metrics))["depth"] == 0, 3600, 0.2)
        drain_s = time.time() - t1
        after = d.stats()
        parts = rss.stop()
        return {
            "scenario": "drain", "backend": args.backend, "sent": args.count, "queued": queued["depth"], "queue_bytes": queued["bytes"],
            "accepted": h["uplinks"]["accepted"], "fill_s": round(fill_s, 1),
            "rss_mb_while_queued": round(st["rss_kb"] / 1024, 1), "drain_s": round(drain_s, 1),
            "drain_per_s": round((queued["depth"] - first) / max(drain_s, 1e-9)),
            "peak_rss_mb": round(after["hwm_kb"] / 1024, 1), **parts,
            "store_on_disk_mb": round(h["store"]["size_on_disk"] / 1e6, 1),
        }
    finally:
        d.stop()
        m.stop()
        shutil.rmtree(work, ignore_errors=True)


def writes(args):
    work, cfg, udp, metrics, m = setup(args, flush_ms=args.flush_ms, broker_up=not args.broker_down)
    d = Daemon(cfg, metrics)
    sub = None if args.broker_down else Sub(m.port, os.path.join(work, "sub.txt"))
    try:
        time.sleep(1.0)
        before = d.stats()
        t0 = time.time()
        simulate(cfg, args.rate, args.count, udp)
        if args.broker_down:
            until(lambda: queue(health(metrics))["depth"] >= args.count, 120)
        else:
            until(lambda: queue(health(metrics))["delivered"] >= args.count, 120)
        time.sleep(max(2.0, 3 * args.flush_ms / 1000))  # let the last commits land (acks: 1 s)
        after = d.stats()
        wall = time.time() - t0
        du = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(work, "db")) for f in fs)
        h = health(metrics)
        if args.broker_down:  # the JSON size, measured on the drain
            m.start()
            sub = Sub(m.port, os.path.join(work, "sub.txt"))
            until(lambda: queue(health(metrics))["depth"] == 0, 300)
        json_size = mean_json_size(sub)
        gross = (after["write_bytes"] - before["write_bytes"]) / args.count
        net = gross - (after["cancelled_write_bytes"] - before["cancelled_write_bytes"]) / args.count
        return {
            "scenario": "writes", "backend": args.backend, "flush_every_ms": args.flush_ms,
            "broker": "down" if args.broker_down else "up", "uplinks": args.count, "rate": args.rate,
            "json_bytes": json_size,
            "write_bytes_per_uplink": round(gross), "net_write_bytes_per_uplink": round(net),
            "net_per_json": round(net / max(json_size, 1), 2),
            "cpu_s_per_1000": round((after["cpu_s"] - before["cpu_s"]) / args.count * 1000, 4),
            "commits": h["store"]["commits"], "store_dir_mb": round(du / 1e6, 2), "wall_s": round(wall, 1),
        }
    finally:
        if sub:
            sub.stop()
        d.stop()
        m.stop()
        shutil.rmtree(work, ignore_errors=True)


def latency(args):
    """UDP arrival (received_at) -> MQTT subscriber, with no dedup window: the store's share."""
    work, cfg, udp, metrics, m = setup(args, flush_ms=args.flush_ms, dedup_ms=0)
    d = Daemon(cfg, metrics)
    sub = Sub(m.port, os.path.join(work, "sub.txt"))
    try:
        time.sleep(1.0)
        before = d.stats()
        simulate(cfg, args.rate, args.count, udp)
        until(lambda: queue(health(metrics))["delivered"] >= args.count, 120)
        after = d.stats()
        time.sleep(0.5)
        lat = []
        for tst, _, payload in sub.lines():
            try:
                recv = json.loads(payload)["received_at"]
            except (ValueError, KeyError):
                continue
            # RFC 3339 with microseconds, UTC.
            t = time.mktime(time.strptime(recv[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
            t += float("0." + recv[20:26]) if len(recv) > 20 else 0.0
            lat.append((float(tst) - t) * 1000)
        lat.sort()
        pct = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else None
        return {
            "scenario": "latency", "backend": args.backend, "flush_every_ms": args.flush_ms, "rate": args.rate,
            "uplinks": args.count, "samples": len(lat), "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
            "max_ms": round(lat[-1], 2) if lat else None,
            "cpu_s_per_1000": round((after["cpu_s"] - before["cpu_s"]) / args.count * 1000, 4),
        }
    finally:
        sub.stop()
        d.stop()
        m.stop()
        shutil.rmtree(work, ignore_errors=True)


def callgrind(args):
    """Instructions per uplink: a traffic run minus an idle run of the same length."""
    results = {}
    for label, count in (("idle", 0), ("traffic", args.count)):
        work, cfg, udp, metrics, m = setup(args)
        out = os.path.join(work, "callgrind.out")
        d = Daemon(cfg, metrics, wrap=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
        try:
            time.sleep(2)
            t0 = time.time()
            if count:
                simulate(cfg, args.rate, count, udp)
                until(lambda: queue(health(metrics))["delivered"] >= count, 300)
            else:
                time.sleep(args.count / args.rate)
            results[label + "_s"] = round(time.time() - t0, 1)
        finally:
            d.stop()
            m.stop()
        ann = subprocess.run(["callgrind_annotate", out], capture_output=True, text=True).stdout
        total = next(int(l.split()[0].replace(",", "")) for l in ann.splitlines() if "PROGRAM TOTALS" in l)
        results[label + "_instructions"] = total
        if count:
            results["top_functions"] = [l.strip() for l in ann.splitlines() if "file:function" not in l][20:40]
        shutil.copy(out, os.path.join(args.out_dir, f"callgrind.{label}.out"))
        shutil.rmtree(work, ignore_errors=True)
    results["instructions_per_uplink"] = round((results["traffic_instructions"] - results["idle_instructions"]) / args.count)
    results["scenario"] = "callgrind"
    results["format"] = args.format
    return results


def idle(args):
    """Wake-ups of an idle daemon: 50 uplinks, then `seconds` without any under `strace -f -c`;
    system calls per second and CPU per second (an idle gateway should sleep)."""
    work, cfg, udp, metrics, m = setup(args)
    d = Daemon(cfg, metrics)
    try:
        time.sleep(5)
        simulate(cfg, 50, 50, udp)
        time.sleep(3)
        before = d.stats()
        out = os.path.join(work, "strace.txt")
        subprocess.run(["timeout", "-s", "INT", str(args.seconds), "strace", "-f", "-c", "-o", out, "-p", str(d.proc.pid)],
                       check=False, stderr=subprocess.DEVNULL)
        after = d.stats()
        calls = {}
        with open(out) as f:
            for line in f:
                p = line.split()
                # "% time  seconds  usecs/call  calls  [errors]  syscall"
                if len(p) >= 5 and p[0][0].isdigit() and p[-1].isidentifier():
                    calls[p[-1]] = int(p[3])
        per_s = {k: round(v / args.seconds, 1) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:6]}
        return {"scenario": "idle", "seconds": args.seconds, "syscalls_per_s": per_s,
                "cpu_ms_per_s": round((after["cpu_s"] - before["cpu_s"]) / args.seconds * 1000, 2)}
    finally:
        d.stop()
        m.stop()
        shutil.rmtree(work, ignore_errors=True)


def soak(args):
    """Hours-long behaviour in minutes: steady load with the broker killed for `outage_s` every
    `outage_every_s`, sampling RSS, open files, queue depth and store size. What must hold: every
    accepted uplink is delivered, and RSS, descriptors and the store's size do not creep up
    from one outage cycle to the next."""
    work, cfg, udp, metrics, m = setup(args)
    d = Daemon(cfg, metrics)
    count = int(args.rate * args.seconds)
    sim = subprocess.Popen([BIN, "simulate", "-c", cfg, "--target", f"127.0.0.1:{udp}", "--rate", str(args.rate),
                            "--count", str(count), *sim_payload_args()], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    fds = lambda: len(os.listdir(f"/proc/{d.proc.pid}/fd"))
    samples, outages, t0 = [], 0, time.time()
    cpu0 = d.stats()["cpu_s"]
    try:
        next_outage = t0 + args.outage_every
        while sim.poll() is None:
            time.sleep(args.sample_every)
            now = time.time()
            if m.proc and now >= next_outage:
                m.stop()
                outages += 1
                back = now + args.outage
            elif not m.proc and now >= back:
                m.start()
                next_outage = now + args.outage_every
            h, st = health(metrics), d.stats()
            samples.append({"t": round(now - t0), "rss_mb": round(st["rss_kb"] / 1024, 1), "fds": fds(),
                            "depth": queue(h)["depth"], "store_mb": round(h["store"]["size_on_disk"] / 1e6, 1)})
        if not m.proc:
            m.start()
        until(lambda: queue(health(metrics))["depth"] == 0, 600, 1)
        h, st = health(metrics), d.stats()
        accepted, delivered = h["uplinks"]["accepted"], queue(h)["delivered"]
        third = max(len(samples) // 3, 1)
        peak = lambda xs, k: max(x[k] for x in xs)
        return {
            "scenario": "soak", "backend": args.backend, "rate": args.rate, "seconds": args.seconds,
            "outages": outages, "outage_s": args.outage, "sent": count, "accepted": accepted,
            "delivered_to_mosquitto": delivered, "lost": accepted - delivered,
            "dropped": queue(h).get("dropped"),
            "cpu_s_per_1000": round((st["cpu_s"] - cpu0) / max(accepted, 1) * 1000, 4),
            "rss_mb_first_third_max": peak(samples[:third], "rss_mb"),
            "rss_mb_last_third_max": peak(samples[-third:], "rss_mb"),
            "peak_rss_mb": round(st["hwm_kb"] / 1024, 1),
            "fds_first": samples[0]["fds"] if samples else None, "fds_last": fds(),
            "fds_max": peak(samples, "fds") if samples else None,
            "max_depth": peak(samples, "depth") if samples else None,
            "store_mb_first_third_max": peak(samples[:third], "store_mb"),
            "store_mb_last_third_max": peak(samples[-third:], "store_mb"),
            "store_mb_end": round(h["store"]["size_on_disk"] / 1e6, 1),
            "simulate": (sim.stdout.read() or "").strip(), "samples": samples,
        }
    finally:
        if sim.poll() is None:
            sim.kill()
        d.stop()
        m.stop()
        shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["throughput", "drain", "writes", "latency", "callgrind", "soak", "idle"])
    p.add_argument("--backend", choices=["sled", "redb"], default="redb")
    p.add_argument("--format", choices=["tts", "chirpstack", "xml", "template"], default="tts",
                   help="the MQTT stream's format (template: docs/templates/thingsboard.j2)")
    p.add_argument("--codec", choices=["none", "cayennelpp", "javascript"], default="none",
                   help="the application's payload codec (and a payload it decodes)")
    p.add_argument("--rate", type=float, default=10_000)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--count", type=int, default=20_000)
    p.add_argument("--flush-ms", type=int, default=100)
    p.add_argument("--broker-down", action="store_true")
    p.add_argument("--subscriber", action="store_true",
                   help="throughput: a mosquitto_sub consuming every uplink at QoS 1 while it runs")
    p.add_argument("--out-dir", default="/tmp", help="callgrind: where callgrind.idle.out and callgrind.traffic.out go")
    p.add_argument("--outage-every", type=float, default=240, help="soak: seconds between broker outages")
    p.add_argument("--outage", type=float, default=60, help="soak: seconds each outage lasts")
    p.add_argument("--sample-every", type=float, default=10, help="soak: seconds between samples")
    p.add_argument("--storage", action="append", default=[], metavar="KEY=VALUE",
                   help="one more [storage] setting, as TOML (repeatable): --storage cache_bytes=2097152")
    p.add_argument("--workers", type=int, default=None,
                   help="the daemon's [runtime] worker_threads (default: the daemon's default, 1; 0 = one per core)")
    a = p.parse_args()
    global CODEC
    CODEC = a.codec
    STORAGE.extend(f"{k.strip()} = {v.strip()}" for k, v in (kv.split("=", 1) for kv in a.storage))
    if a.workers is not None:
        RUNTIME.append(f"worker_threads = {a.workers}")
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} missing: cargo build --release --locked")
    # Checked before anything starts: a consumer that fails to start would leave the daemon
    # and broker of the run behind.
    for tool in ("mosquitto", "mosquitto_sub"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} missing: apt install mosquitto mosquitto-clients")
    r = {"throughput": throughput, "drain": drain, "writes": writes, "latency": latency,
         "callgrind": callgrind, "soak": soak, "idle": idle}[a.scenario](a)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
