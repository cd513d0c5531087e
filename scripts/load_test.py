"""A bounded load test of a running lyra server: many concurrent clients, a fixed number of requests,
a time cap. Reports served, refused (queue full: HTTP 429 / Gradio's "queue is full") and failed
requests, the p50/p95 wait of the served ones, and the server's RSS before and after.

    python -m lyra.serve run_dir=R &                                 # or python -m lyra.web run_dir=R &
    python scripts/load_test.py --url http://127.0.0.1:8000 --pid $! --clients 100 --requests 500
    python scripts/load_test.py --url http://127.0.0.1:7860 --target web --pid $! --clients 100 --requests 500

--target serve posts OpenAI chat completions (non-streaming) to URL/v1/chat/completions; --target web
calls the Gradio page's /chat API through gradio_client. Loopback only: the script refuses any other
host, so it never floods a machine it does not own. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    import psutil

    return psutil.Process(pid).memory_info().rss


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def serve_request(url: str, api_key: str | None, max_tokens: int, timeout: float, index: int) -> str:
    """'served', 'refused' or 'failed: ...' for one chat completion."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key or 'undefined'}"}
    body = {"messages": [{"role": "user", "content": f"Hello, request {index}!"}], "max_tokens": max_tokens,
            "stream": False, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=timeout)
    if response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("stop", "length"):
        return "served"
    if response.status_code == 429:
        return "refused"
    return f"failed: HTTP {response.status_code} {response.text[:200]}"


def web_request(url: str, api_key: str | None, max_tokens: int, timeout: float, index: int) -> str:
    from gradio_client import Client

    client = Client(url, verbose=False)
    try:
        client.predict(message=f"Hello, request {index}!", history=[], max_new_tokens=max_tokens, api_name="/chat")
    except Exception as error:  # gradio_client raises AppError / ValueError with the server's message
        if "queue is full" in str(error).lower():
            return "refused"
        raise
    return "served"


def run_load(url: str, target: str, clients: int, requests: int, max_tokens: int, time_cap: float,
             pid: int | None = None, api_key: str | None = None, timeout: float = 120, pause: float = 0) -> dict:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"load_test: {url} is not a loopback address; this script only loads this machine")
    send = serve_request if target == "serve" else web_request
    counts = {"served": 0, "refused": 0, "failed": 0, "not_sent": 0}
    waits: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(requests))
    deadline = time.monotonic() + time_cap
    rss_before = rss_bytes(pid)
    start = time.monotonic()

    def client() -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            if time.monotonic() > deadline:
                with lock:
                    counts["not_sent"] += 1
                continue
            sent = time.monotonic()
            try:
                outcome = send(url, api_key, max_tokens, timeout, index)
            except Exception as error:
                outcome = f"failed: {type(error).__name__}: {error}"
            with lock:
                if outcome == "served":
                    counts["served"] += 1
                    waits.append(time.monotonic() - sent)
                elif outcome == "refused":
                    counts["refused"] += 1
                else:
                    counts["failed"] += 1
                    failures.append(outcome[:300])
            if outcome == "refused" and pause:
                time.sleep(pause)  # a polite client backs off after a 429 (as Retry-After asks)

    threads = [threading.Thread(target=client, name=f"load-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rss_after = rss_bytes(pid)
    return {"target": target, "url": url, "clients": clients, "requests": requests, **counts,
            "p50_wait_s": percentile(waits, 0.5), "p95_wait_s": percentile(waits, 0.95),
            "elapsed_s": round(time.monotonic() - start, 2), "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "rss_growth_bytes": None if rss_before is None else rss_after - rss_before,
            "failures": failures[:5]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server's root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--target", choices=("serve", "web"), default="serve")
    parser.add_argument("--clients", type=int, default=100, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=500, help="requests in all")
    parser.add_argument("--max-tokens", type=int, default=16, help="reply length per request")
    parser.add_argument("--time-cap", type=float, default=600, help="seconds after which no request is sent")
    parser.add_argument("--timeout", type=float, default=120, help="seconds one request may take")
    parser.add_argument("--pause", type=float, default=0, help="seconds a client waits after a refusal (0 = none)")
    parser.add_argument("--pid", type=int, default=None, help="the server's process id, to report its RSS")
    parser.add_argument("--api-key", default=None, help="for lyra.serve with a key (else Bearer undefined)")
    args = parser.parse_args(argv)
    report = run_load(args.url.rstrip("/"), args.target, args.clients, args.requests, args.max_tokens,
                      args.time_cap, args.pid, args.api_key, args.timeout, args.pause)
    print(json.dumps(report))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
