"""Load test of the web page's API on loopback: many concurrent gradio_client users, bounded.

    python scripts/load_test_web.py --run-dir outputs/RUN                  # 100 clients, 500 requests, 300 s cap
    python scripts/load_test_web.py --clients 10 --requests 60 --max-queue-size 4   # what the test runs

Starts `python -m lyra.web` on 127.0.0.1 (a free port, a login from a temp auth file, greedy
replies of --max-new-tokens tokens), sends --warmup requests, reads the server's RSS, then lets
--clients threads (each its own logged-in gradio_client.Client) send /chat requests until
--requests have been sent or --time-cap seconds have passed; a refused client waits --backoff s. Reports, as one JSON object:

- served (a reply came back), refused (Gradio's queue was full: `max_queue_size`), failed (anything
  else: an error, a timeout), and requests not sent when the time cap hit;
- p50 / p95 wait of the served requests (submit to complete reply, queueing included);
- the server's RSS before and after, and its growth; exit 1 when the growth is over --max-rss-growth-mb
  or a request failed.

Without --run-dir it first trains a 2-step smoke run into a temp dir. Linux only (RSS from /proc).
Loopback only: the server binds 127.0.0.1 and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "load", "load-test-password"
MESSAGES = ["你好！", "今天過得怎樣？", "推薦一本書", "Tell me about yourself.", "晚安"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def smoke_run(workdir: Path, env: dict) -> Path:
    run_dir = workdir / "smoke-run"
    subprocess.run([sys.executable, "-m", "lyra.train", "experiment=smoke", "logger=none", "eval=none",
                    "trainer.max_steps=2", "trainer.save_strategy=no", "trainer.eval_strategy=no",
                    f"hydra.run.dir={run_dir}"], cwd=workdir, env=env, check=True, capture_output=True)
    return run_dir


def start_server(run_dir: Path, workdir: Path, env: dict, args) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    users = workdir / "users.txt"
    users.write_text(f"{USER}:{PASSWORD}\n")
    users.chmod(0o600)
    log_path = workdir / "web-server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "lyra.web", f"run_dir={run_dir}", "server_name=127.0.0.1", f"server_port={port}",
             f"auth_file={users}", f"max_queue_size={args.max_queue_size}", "generation.do_sample=false",
             "generation.repetition_penalty=3.0", f"generation.max_new_tokens={args.max_new_tokens}"],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"lyra.web exited with {process.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url, log_path
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"lyra.web did not answer within 300 s:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.5)


def load(url: str, args) -> dict:
    """--clients threads share a budget of --requests; each request's outcome and wait are recorded."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    lock = threading.Lock()
    budget = {"left": args.requests}
    waits: list[float] = []
    counts = {"served": 0, "refused": 0, "failed": 0}
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + args.time_cap

    def take() -> bool:
        with lock:
            if budget["left"] <= 0 or time.monotonic() >= stop_at:
                return False
            budget["left"] -= 1
            return True

    def record(outcome: str, wait: float | None = None, error: str | None = None) -> None:
        with lock:
            counts[outcome] += 1
            if wait is not None:
                waits.append(wait)
            if error:
                errors[error] = errors.get(error, 0) + 1

    def user(index: int) -> None:
        try:
            client = Client(url, auth=(USER, PASSWORD), verbose=False)
        except Exception as error:  # a client that cannot even connect: its share counts as failed
            while take():
                record("failed", error=f"connect: {type(error).__name__}")
            return
        sent = 0
        while take():
            message = MESSAGES[(index + sent) % len(MESSAGES)]
            sent += 1
            start = time.monotonic()
            try:
                reply = client.predict(message, [], api_name="/chat")
            except QueueError:
                record("refused")
                time.sleep(args.backoff)  # as a polite client would, instead of hammering a full queue
                continue
            except AppError as error:
                queue_full = "queue" in str(error).lower() and "full" in str(error).lower()
                record("refused" if queue_full else "failed", error=None if queue_full else str(error)[:80])
                time.sleep(args.backoff if queue_full else 0)
                continue
            except Exception as error:
                record("failed", error=f"{type(error).__name__}: {str(error)[:80]}")
                continue
            record("served" if isinstance(reply, str) else "failed", time.monotonic() - start,
                   None if isinstance(reply, str) else f"reply of type {type(reply).__name__}")

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(args.clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, stop_at - time.monotonic()) + 120)
    return {**counts, "not_sent": budget["left"], "still_running": sum(t.is_alive() for t in threads),
            "seconds": round(time.monotonic() - started, 1), "errors": errors,
            "wait_p50_s": percentile(waits, 50), "wait_p95_s": percentile(waits, 95)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="a training run (default: train a 2-step smoke run)")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--requests", type=int, default=500, help="total requests sent, all clients together")
    parser.add_argument("--warmup", type=int, default=3, help="requests before the first RSS reading")
    parser.add_argument("--time-cap", type=float, default=300, help="seconds; unsent requests are reported")
    parser.add_argument("--backoff", type=float, default=1.0, help="seconds a refused client waits before its next request")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-queue-size", type=int, default=32, help="the server's max_queue_size")
    parser.add_argument("--max-rss-growth-mb", type=float, default=200, help="exit 1 above this growth")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="lyra-load-web-"))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    env.pop("LYRA_WEB_AUTH", None)
    run_dir = args.run_dir.resolve() if args.run_dir else smoke_run(workdir, env)
    process, url, log_path = start_server(run_dir, workdir, env, args)
    try:
        from gradio_client import Client

        warm = Client(url, auth=(USER, PASSWORD), verbose=False)
        for message in MESSAGES[:args.warmup]:
            warm.predict(message, [], api_name="/chat")
        rss_before = rss_mb(process.pid)
        result = load(url, args)
        time.sleep(1)  # let the last streams close
        rss_after = rss_mb(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    growth = rss_after - rss_before
    report = {"clients": args.clients, "requests": args.requests, "time_cap_s": args.time_cap, "backoff_s": args.backoff,
              "max_queue_size": args.max_queue_size, "max_new_tokens": args.max_new_tokens, **result,
              "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
              "rss_growth_mb": round(growth, 1), "max_rss_growth_mb": args.max_rss_growth_mb,
              "password_in_server_log": PASSWORD in log_path.read_text()}
    print(json.dumps(report, indent=2))
    ok = (growth <= args.max_rss_growth_mb and result["failed"] == 0 and result["still_running"] == 0
          and not report["password_in_server_log"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
