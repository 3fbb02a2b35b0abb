"""Teacher throughput against the local OpenAI-compatible server: calls per second versus the limit C / L.

The server (tests/fault_server.py) runs in its own process and answers every completion after a fixed
latency L; the teacher's call engine keeps C calls in flight, each cached, accounted and budgeted as
in a real stage. For reference, the bare async openai client on the same calls is measured in the
same run. The last line is `throughput/limit: X.XX` (goal: >= 0.90 at C = 64, L = 100 ms).

With `--hidden-rpm R` the server enforces R requests per minute that the engine is not told (teacher.rpm
and tpm unset): once with the limit announced in x-ratelimit-* headers, once without, each run printing
the calls answered against what the limit allows in that time (R / 60 per second, plus the one second's
worth the server's bucket holds at the start) and the share of requests answered 429 (goal with
headers: >= 0.90 of the limit with <= 5 % of requests 429'd).

    python benchmarks/teacher_throughput.py [--concurrency 64] [--latency 0.1] [--rounds 60]
    python benchmarks/teacher_throughput.py --hidden-rpm 6000 [--calls 3000]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from iga.data.teacher.engine import CallEngine  # noqa: E402
from iga.data.teacher.openai_teacher import load_prompts, request  # noqa: E402
from iga.params import load_params  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("the server did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_client_rate(base_url: str, bodies: list[dict], concurrency: int) -> float:
    """Calls per second of the bare AsyncOpenAI client (same transport), no cache or accounting."""
    async def run() -> float:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        client = openai.AsyncOpenAI(api_key="sk-bench", base_url=base_url, max_retries=0,
                                    http_client=openai.DefaultAioHttpClient(limits=limits))
        slots = asyncio.Semaphore(concurrency)

        async def one(body: dict) -> None:
            async with slots:
                response = await client.chat.completions.with_raw_response.create(**body)
                assert response.http_response.text

        await asyncio.gather(*(one(b) for b in bodies[:concurrency]))  # warm the connections
        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        rate = len(bodies) / (time.perf_counter() - start)
        await client.close()
        return rate

    return asyncio.run(run())


def start_server(latency: float, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_server.py"), "--port", str(port),
                               "--latency", str(latency), *extra])
    try:
        wait_listening(port, server)
    except BaseException:
        server.terminate()
        raise
    return server, f"http://127.0.0.1:{port}/v1"


def engine_and_calls(base_url: str, cache: str, concurrency: int, n: int, max_retries: int = 0):
    """A call engine as a stage builds it (rpm and tpm unset) and n distinct verify calls."""
    params = load_params(ROOT / "params.yaml", overrides={
        "seeds.source": "jsonl", "seeds.path": "unused.jsonl", "teacher.provider": "openai",
        "teacher.openai.model": "gpt-4o-mini", "teacher.openai.base_url": base_url,
        "teacher.openai.max_retries": max_retries, "teacher.concurrency": concurrency, "teacher.rpm": None,
        "teacher.tpm": None, "teacher.cache_dir": cache, "teacher.budget_usd": 1e6})
    prompts = load_prompts(params.teacher.openai.prompt_version)
    calls = [request(params, prompts, "verify", 1, 1, dag="{}", domain="medical",
                     instance_problem=f"problem {i}", instance_solution="Step 1: ...") for i in range(n)]
    return CallEngine(params, "sk-bench", params.teacher.budget_usd), calls


def hidden_limit(args: argparse.Namespace) -> None:
    """The engine against a limit it is not told, announced in headers or not."""
    limit = args.hidden_rpm / 60
    print(f"hidden limit {args.hidden_rpm:.0f} requests/min = {limit:.1f}/s; C = {args.concurrency}, "
          f"L = {args.latency * 1000:.0f} ms, {args.calls} calls, {os.cpu_count()} CPUs; teacher.rpm/tpm unset")
    for label, extra in (("announced in x-ratelimit headers", []), ("not announced", ["--no-limit-headers"])):
        server, base_url = start_server(args.latency, "--rpm", str(args.hidden_rpm), *extra)
        try:
            (ROOT / ".cache").mkdir(exist_ok=True)
            with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as cache:
                engine, calls = engine_and_calls(base_url, cache, args.concurrency, args.calls, max_retries=20)
                try:
                    start = time.perf_counter()
                    engine.fetch(calls)
                    elapsed = time.perf_counter() - start
                finally:
                    engine.close()
                rows = engine.ledger.rows()
        finally:
            server.terminate()
            server.wait()
        answered = sum(r["error"] is None for r in rows)
        attempts = sum(r["attempts"] for r in rows)
        allowed = limit * elapsed + limit  # the rate for the run's time, plus one second's worth saved up at the start
        print(f"limit {label:34s} throughput/limit: {answered / allowed:.2f} "
              f"({answered / elapsed:.1f}/s in {elapsed:.1f} s); 429'd: {(attempts - len(rows)) / attempts:.1%} "
              f"of {attempts} requests; {len(rows) - answered} calls failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds")
    parser.add_argument("--rounds", type=int, default=60, help="calls = rounds x concurrency (~7 s at the defaults)")
    parser.add_argument("--hidden-rpm", type=float, help="measure against a limit the engine is not told")
    parser.add_argument("--calls", type=int, default=3000, help="--hidden-rpm: calls per run (30 s each at 6000)")
    args = parser.parse_args()
    if args.hidden_rpm:
        return hidden_limit(args)
    c, lat, n = args.concurrency, args.latency, args.rounds * args.concurrency

    server, base_url = start_server(lat)
    try:
        (ROOT / ".cache").mkdir(exist_ok=True)  # where the cache lives by default: the disk matters
        with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as cache:
            engine, calls = engine_and_calls(base_url, cache, c, n + c)
            try:
                engine.fetch(calls[:c])  # warm the connections
                server_cpu = cpu_seconds(server.pid)
                start = time.perf_counter()
                engine.fetch(calls[c:])
                elapsed = time.perf_counter() - start
                server_cpu = cpu_seconds(server.pid) - server_cpu
            finally:
                engine.close()
            assert len(list(Path(cache).glob("??/*.json"))) == n + c, "a call did not reach the cache"
        raw = raw_client_rate(base_url, [call.body for call in calls[c:]], c)
    finally:
        server.terminate()
        server.wait()

    rate, limit = n / elapsed, c / lat
    print(f"C = {c} in flight, L = {lat * 1000:.0f} ms, {n} calls, {os.cpu_count()} CPUs (server in its own process)")
    print(f"bare async openai client: {raw:7.1f} calls/s = {raw / limit:.2f} of the limit")
    print(f"teacher call engine:      {rate:7.1f} calls/s in {elapsed:.2f} s (cache, ledger, budget, limits)")
    print(f"limit C / L:              {limit:7.1f} calls/s; the server's process was busy {server_cpu / elapsed:.0%} "
          f"of the engine's run")
    print(f"throughput/limit: {rate / limit:.2f}")


if __name__ == "__main__":
    main()
