"""Gateway added latency and throughput versus calling the upstream directly, side by side.

Three processes on 127.0.0.1: the upstream (tests/upstream_stub.py: uvicorn + uvloop + httptools),
the gateway (`distillguard gateway`, real request signals, store worker on, default policy
shape with roomy limits), and this load generator (open loop: request i is sent at t0 + i/rate
whatever happened to earlier ones; latency is counted from the scheduled send time, so queueing
shows up instead of being hidden by coordinated omission). For each mode (non-streaming,
streaming) and rate, the upstream is called directly and through the gateway in alternation,
`--repeat` times; "added" is the median over the repeats of gateway minus direct, each pair
measured back to back. Every request carries a prompt the run has not sent before (GSM8K
questions, then the same with a variant number), so the gateway computes request signals for
every one of them instead of answering from its signal cache.
"server CPU" is the server process's own; the gateway's child processes (request signals, store
worker, WAL fsync) are reported next to it, so the whole cost is on the line, and "loadgen" is
this process's CPU per request. "waited for a CPU" is the time the server's event-loop thread
was runnable but not running (schedstat), per request: on a shared machine it says how much of
the latency the other jobs took.
Optionally the LiteLLM proxy (in its own virtualenv) is measured the same way as a peer.

    .venv/bin/python benchmarks/gateway.py                       # 200, 500, 1000 req/s, 5 s each
    .venv/bin/python benchmarks/gateway.py --rates 500 --repeat 5 --nice -5
    .venv/bin/python benchmarks/gateway.py --gateway-src /tmp/old-gateway/src   # older code
    .venv/bin/python benchmarks/gateway.py --signals conftest_gateway:controlled_signals
    .venv/bin/python benchmarks/gateway.py --litellm-python /path/to/litellm-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import itertools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

from _machine import machine_summary, peak_rss_mib  # benchmarks/ is sys.path[0]
from distillguard.gateway.upstream import UpstreamError, UpstreamPool

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PY = sys.executable
BENCH_KEY = "bench-key-not-a-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts() -> list[str]:
    """Real task prompts (GSM8K) when ../shared/data is present, else varied synthetic ones."""
    path = SHARED / "tasks" / "gsm8k_train.jsonl"
    if path.exists():
        out = [json.loads(line)["question"] for line in path.open() if line.strip()]
        random.Random(1).shuffle(out)
        return out
    return [f"Question {i}: what is {i} plus {i * 7}? Explain briefly." for i in range(2000)]


class Prompts:
    """Prompts never sent before in this run: the corpus, then again with a variant number."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.counter = itertools.count()

    def next(self) -> str:
        i = next(self.counter)
        text = self.texts[i % len(self.texts)]
        return text if i < len(self.texts) else f"{text} (variant {i // len(self.texts)})"


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0,
               headers: dict | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1, headers=headers).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def set_priority(nice: int, pid: int | None = None) -> None:
    """Niceness for a process and for its session's scheduling group.

    With autogroups (`/proc/sys/kernel/sched_autogroup_enabled`, on here) the kernel first
    shares the CPU equally between sessions, and a process's niceness counts only inside its
    own: each server this script starts is a session, so on a machine shared with other jobs
    only the group's niceness gives it a larger share."""
    if pid is None:
        os.nice(nice)
    else:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid or 'self'}/autogroup").write_text(f"{nice}\n")


def start(cmd: list[str], env: dict | None = None, log: Path | None = None,
          nice: int = 0) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)
    if nice:
        set_priority(nice, proc.pid)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def gateway_config(tmp: Path, upstream: str, port: int, signals: str | None = None,
                   signals_wait: str | None = None, extra: list[str] | None = None) -> Path:
    policy = tmp / "policy.yaml"
    policy.write_text(
        "mode: enforce\nwindow_s: 60\n"
        "limits:\n"
        "  - {id: account, scope: account, rate_per_s: 100000, burst: 1000000}\n"
        "  - {id: cluster, scope: cluster, rate_per_s: 100000, burst: 1000000,"
        " when: {account.flagged: true}}\n"
        "rules:\n"
        "  - {id: flagged, when: {account.flagged: true}, action: degrade}\n"
        "  - {id: cot-farm, action: challenge, when: {signal.cot: true,"
        " live.cot_share: {gte: 0.9}, live.template_repeat_share: {gte: 0.8},"
        " live.requests: {gte: 100}}}\n")
    cfg = tmp / "gateway.yaml"
    cfg.write_text(
        f"upstream: {upstream}\nlisten: {{host: 127.0.0.1, port: {port}}}\n"
        f"store: {tmp / 'store.duckdb'}\npolicy: {policy}\n"
        f"wal: {{dir: {tmp / 'wal'}, fsync: batch}}\n"
        "auth: {admin_token_env: BENCH_ADMIN}\n"
        "keys:\n  - {key_env: BENCH_KEY, account_id: bench-account}\n"
        + (f"signals: {signals}\n" if signals else "")
        + (f"signals_wait: {signals_wait}\n" if signals_wait else "")
        + "".join(f"{item.replace('=', ': ', 1)}\n" for item in extra or ()))
    return cfg


def litellm_config(tmp: Path, upstream: str) -> Path:
    cfg = tmp / "litellm.yaml"
    cfg.write_text(
        "model_list:\n"
        "  - model_name: stub-model\n"
        f"    litellm_params: {{model: openai/stub-model, api_base: {upstream}/v1,"
        " api_key: not-used}\n"
        "general_settings: {master_key: sk-bench}\n"
        "litellm_settings: {drop_params: true, telemetry: false}\n")
    return cfg


async def run_load(url: str, key: str, rate: int, seconds: float, stream: bool,
                   texts: Prompts) -> dict:
    """Open-loop load at `rate` for `seconds`; per-request latency from the scheduled time.

    The client is the gateway's own upstream client (`distillguard.gateway.upstream`): at
    ~0.07 ms of CPU per request (aiohttp ~0.3 ms, httpx ~1.6 ms) the load generator takes as
    little as possible of the 2 cores it shares with the servers it measures.
    """
    n = max(1, int(rate * seconds))
    lat: list[float] = []
    ttfb: list[float] = []
    errors: dict[str, int] = {}
    headers = [(b"authorization", f"Bearer {key}".encode()),
               (b"content-type", b"application/json")]
    pool = UpstreamPool(url, timeout_s=60, connect_timeout_s=10)
    bodies = [orjson.dumps({"model": "stub-model", "stream": stream, "messages": [
        {"role": "user", "content": texts.next()}]}) for _ in range(n)]

    async def one(i: int, scheduled: float) -> None:
        try:
            r = await pool.request("POST", "/v1/chat/completions", headers, bodies[i])
            first = None
            try:
                async for _ in r.iter_chunks():
                    if first is None:
                        first = time.perf_counter() - scheduled
            finally:
                r.release()
            if r.status != 200:
                errors[str(r.status)] = errors.get(str(r.status), 0) + 1
                return
            lat.append(time.perf_counter() - scheduled)
            ttfb.append(first or 0.0)
        except UpstreamError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    tasks = []
    cpu0 = time.process_time()
    t0 = time.perf_counter() + 0.05
    for i in range(n):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    loadgen_cpu = time.process_time() - cpu0
    await pool.close()
    return {"n": n, "ok": len(lat), "errors": errors, "elapsed": elapsed,
            "throughput": len(lat) / elapsed, "lat": lat, "ttfb": ttfb,
            "loadgen_cpu_ms": loadgen_cpu / n * 1000}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_delay_seconds(pid: int) -> float:
    """Time the process's main thread (the event loop) spent runnable but waiting for a CPU
    (Linux schedstat): on a shared machine, how much of the latency is the neighbours'."""
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[1]) / 1e9


def descendants(pid: int) -> list[int]:
    """Child processes of `pid` (of all its threads), recursively (Linux /proc)."""
    out = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            kids = [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *descendants(kid)]
    return out


def children_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU time of each descendant of `pid` (the gateway's signals process and store worker)."""
    out = {}
    for kid in descendants(pid):
        with contextlib.suppress(OSError):  # it may have exited meanwhile
            out[kid] = cpu_seconds(kid)
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def gateway_added_mean_ms(url: str) -> tuple[float, int, str]:
    """Mean time the gateway itself reports spending outside the upstream call, and its
    garbage-collector passes (count, total and longest bucket per generation)."""
    text = httpx.get(url + "/metrics", headers={"authorization": "Bearer bench-admin"}).text
    total = count = 0.0
    gc: dict[str, dict] = {}
    for line in text.splitlines():
        if line.startswith("distillguard_gateway_added_latency_seconds_sum"):
            total = float(line.split()[1])
        elif line.startswith("distillguard_gateway_added_latency_seconds_count"):
            count = float(line.split()[1])
        elif line.startswith("distillguard_gateway_gc_pause_seconds"):
            name, value = line.rsplit(" ", 1)
            gen = name.split('generation="')[1].split('"')[0]
            entry = gc.setdefault(gen, {"le": 0.0, "prev": 0.0})
            if "_sum" in name:
                entry["sum"] = float(value)
            elif "_count" in name:
                entry["count"] = float(value)
            elif "_bucket" in name and float(value) > entry["prev"]:
                le = name.split('le="')[1].split('"')[0]
                entry["le"], entry["prev"] = le, float(value)
    gc_text = ", ".join(f"gen{g}: {int(e.get('count', 0))} passes, {e.get('sum', 0) * 1000:.0f} "
                        f"ms, longest <= {e['le']} s" for g, e in sorted(gc.items()))
    return (total / count * 1000 if count else float("nan")), int(count), gc_text or "n/a"


def measure(name: str, url: str, key: str, pid: int, rate: int, seconds: float, stream: bool,
            texts: Prompts) -> dict:
    """One open-loop run against one target, with the CPU its server (and children) used."""
    before, waited = cpu_seconds(pid), run_delay_seconds(pid)
    kids_before = children_cpu_seconds(pid)
    result = asyncio.run(run_load(url, key, rate, seconds, stream, texts))
    used = cpu_seconds(pid) - before
    waited = run_delay_seconds(pid) - waited
    kids_used = sum(v - kids_before.get(k, 0.0) for k, v in children_cpu_seconds(pid).items())
    n = max(1, result["n"])
    result.update(name=name, cpu_ms=used / n * 1000, children_cpu_ms=kids_used / n * 1000,
                  cpu_wait_ms=waited / n * 1000,
                  p50=pct(result["lat"], .5), p99=pct(result["lat"], .99),
                  ttfb50=pct(result["ttfb"], .5), load=os.getloadavg()[0])
    return result


def line(mode: str, rate: int, r: dict, direct: dict | None, label: str = "") -> str:
    out = (f"{mode:9s} {rate:5d}/s {r['name']:8s}{label} ok {r['ok']:5d}/{r['n']:<5d} "
           f"thr {r['throughput']:7.1f}/s  p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  "
           f"server CPU {r['cpu_ms']:.2f} ms/req")
    if r["children_cpu_ms"] >= 0.005:
        out += f" (+{r['children_cpu_ms']:.2f} in child processes)"
    out += f"  loadgen {r['loadgen_cpu_ms']:.2f}  waited for a CPU {r['cpu_wait_ms']:.2f} ms/req"
    if mode == "stream":
        out += f"  ttfb p50 {r['ttfb50']:6.2f} ms"
    if direct is not None:
        out += (f"  | added p50 {r['p50'] - direct['p50']:+6.2f} ms  "
                f"p99 {r['p99'] - direct['p99']:+7.2f} ms")
    if r["errors"]:
        out += f"  errors {r['errors']}"
    return out + f"  (load {r['load']:.1f})"


def median_run(runs: list[dict]) -> dict:
    """Per-field medians over repeated runs of one target (the name and errors of the first)."""
    keys = ("throughput", "p50", "p99", "ttfb50", "cpu_ms", "children_cpu_ms", "loadgen_cpu_ms",
            "cpu_wait_ms", "load", "ok", "n")
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {**med, "name": runs[0]["name"], "errors": errors, "ok": int(med["ok"]),
            "n": int(med["n"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="200,500,1000")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--modes", default="nonstream,stream")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per mode and rate (direct and gateway alternate); medians shown")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness of this process and of every server it starts, and of their "
                         "scheduling groups (e.g. -10 on a machine shared with other jobs; "
                         "negative values need root)")
    ap.add_argument("--gateway-src",
                    help="run the gateway from this source tree (PYTHONPATH), e.g. a git "
                         "worktree of an older commit, against the same stub and load")
    ap.add_argument("--signals",
                    help="request-signal function of the gateway (module:function; tests/ is "
                         "importable), e.g. conftest_gateway:controlled_signals to measure the "
                         "gateway without the cost of real signals")
    ap.add_argument("--signals-wait", choices=("needed", "always"),
                    help="the gateway's signals_wait (default: its config default, needed); "
                         "the benchmark policy's signal rule is the example policy's "
                         "reasoning-harvest (cot, cot share >= 0.9, template repeats >= 0.8, "
                         ">= 100 requests): with needed a response waits for its signals only "
                         "while the shares could cross those thresholds, with always each does")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra top-level gateway config entry, e.g. --set decide_during_call=false")
    ap.add_argument("--litellm-python", help="python of a venv with litellm[proxy] installed")
    ap.add_argument("--litellm-rates", default="200",
                    help="rates at which the LiteLLM peer is measured (it saturates early)")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    modes = args.modes.split(",")
    if args.nice:
        set_priority(args.nice)
    import uvloop

    uvloop.install()
    print(machine_summary())
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other work on the machine "
          f"inflates every figure below); niceness {os.nice(0)} (process and session group)"
          + (f"; gateway from {args.gateway_src}" if args.gateway_src else "")
          + (f"; signals {args.signals}" if args.signals else "")
          + (f"; signals_wait {args.signals_wait}" if args.signals_wait else "")
          + "".join(f"; {item}" for item in args.set))
    texts = Prompts(prompts())
    tmp = Path(tempfile.mkdtemp(prefix="dg-bench-"))
    up_port, gw_port, ll_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    procs = []
    env = {**os.environ, "BENCH_KEY": BENCH_KEY, "BENCH_ADMIN": "bench-admin"}
    gw_env = {**env, "PYTHONPATH": os.pathsep.join(
        p for p in (args.gateway_src, env.get("PYTHONPATH"), str(REPO / "tests")) if p)}
    try:
        procs.append(start([PY, str(REPO / "tests" / "upstream_stub.py"), "--port",
                            str(up_port)], log=tmp / "upstream.log", nice=args.nice))
        wait_ready(upstream + "/v1/models", procs[-1])
        procs.append(start([str(Path(PY).parent / "distillguard"), "gateway", "-c",
                            str(gateway_config(tmp, upstream, gw_port, args.signals,
                                               args.signals_wait, args.set)),
                            "--log-level", "warning"], env=gw_env, log=tmp / "gateway.log",
                           nice=args.nice))
        gateway = f"http://127.0.0.1:{gw_port}"
        wait_ready(gateway + "/readyz", procs[-1])
        targets = {"direct": (upstream, BENCH_KEY), "gateway": (gateway, BENCH_KEY)}
        pids = {"direct": procs[0].pid, "gateway": procs[1].pid}
        if args.litellm_python:
            procs.append(start([str(Path(args.litellm_python).parent / "litellm"), "--config",
                                str(litellm_config(tmp, upstream)), "--port", str(ll_port),
                                "--host", "127.0.0.1", "--num_workers", "1"],
                               env={**env, "LITELLM_LOG": "ERROR"}, log=tmp / "litellm.log",
                               nice=args.nice))
            litellm = f"http://127.0.0.1:{ll_port}"
            wait_ready(litellm + "/health/liveliness", procs[-1])
            targets["litellm"] = (litellm, "sk-bench")
            pids["litellm"] = procs[-1].pid
        for url, key in targets.values():  # warm up connections and caches
            asyncio.run(run_load(url, key, 100, 1.0, False, texts))
        rows = []
        for mode in modes:
            for rate in rates:
                runs: dict[str, list[dict]] = {}
                added: dict[str, list[tuple[float, float]]] = {}
                for rep in range(args.repeat):
                    results = {}
                    for name, (url, key) in targets.items():
                        if name == "litellm" and str(rate) not in args.litellm_rates.split(","):
                            continue
                        results[name] = measure(name, url, key, pids[name], rate, args.seconds,
                                                mode == "stream", texts)
                        runs.setdefault(name, []).append(results[name])
                    d = results["direct"]
                    for name, r in results.items():
                        if name != "direct":
                            added.setdefault(name, []).append((r["p50"] - d["p50"],
                                                               r["p99"] - d["p99"]))
                        label = f" #{rep + 1}" if args.repeat > 1 else ""
                        print(line(mode, rate, r, None if name == "direct" else d, label),
                              flush=True)
                medians = {name: median_run(rs) for name, rs in runs.items()}
                for name, pairs in added.items():
                    medians[name]["added_p50"] = statistics.median(p for p, _ in pairs)
                    medians[name]["added_p99"] = statistics.median(q for _, q in pairs)
                    if args.repeat > 1:
                        print(f"{mode:9s} {rate:5d}/s {name:8s} median of {args.repeat}: "
                              f"added p50 {medians[name]['added_p50']:+6.2f} ms  "
                              f"p99 {medians[name]['added_p99']:+7.2f} ms", flush=True)
                rows.append((mode, rate, medians))
        decisions = httpx.get(gateway + "/admin/state", headers={
            "authorization": "Bearer bench-admin"}).json().get("decisions")
        if decisions:
            print(f"gateway decisions: {decisions}")
        mean_ms, count, gc_text = gateway_added_mean_ms(gateway)
        print(f"gateway's own measure (all runs, {count} requests): mean time outside the "
              f"upstream call {mean_ms:.3f} ms; GC passes of the gateway process: {gc_text}")
        summary = {"args": vars(args), "rows": [{"mode": m, "rate": r, **{
            n: {k: v for k, v in x.items() if k not in ("lat", "ttfb")}
            for n, x in res.items()}} for m, r, res in rows]}
        out = tmp / "results.json.gz"
        out.write_bytes(gzip.compress(orjson.dumps(summary)))
        print(f"raw results: {out}")
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp / "wal", ignore_errors=True)  # keep the logs and results only
        for path in tmp.glob("store.duckdb*"):
            path.unlink()
    print(f"peak RSS (load generator and children): {peak_rss_mib():.0f} MiB; "
          f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
