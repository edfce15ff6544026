"""Load on ``unfog serve``: N clients each sending M txt2img requests at once to a server in this
process (the embedded shapes model, 64 px), while another client polls /progress. Prints
requests/s, the request latency percentiles, the /progress latency percentiles during the run,
and checks every request came back with the seeds it asked for.

Requests queue: one generation runs at a time, so latency grows with the queue; the figure that
matters for a UI is /progress staying fast while the queue is full.

    python benchmarks/server_load.py                       # 10 clients x 5 requests, 20 steps
    python benchmarks/server_load.py --clients 4 --requests 3 --steps 10
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
import torch
import uvicorn

from unfog.embedded import DEFAULT_TEXT_MODEL, default_model_path
from unfog.server.app import Limits, ServerConfig, create_app
from unfog.server.library import Library
from machine import cpu_flags


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--requests", type=int, default=5, help="requests per client")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--preview-every", type=int, default=5, help="live preview every N steps (0: none; default 5)")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ServerConfig(Library(default_model_path(DEFAULT_TEXT_MODEL)), limits=Limits(max_batch=4),
                                  preview_every=args.preview_every))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/sdapi/v1"
    body = {"prompt": "a red circle to the left of a blue square", "steps": args.steps, "width": 64, "height": 64,
            "sampler_name": "Euler a", "cfg_scale": 2}
    requests.post(f"{url}/txt2img", json={**body, "seed": 0}).raise_for_status()  # load the model first

    def client(c: int) -> list[tuple[float, bool]]:
        out = []
        with requests.Session() as session:
            for k in range(args.requests):
                seed = 1000 * c + k
                t0 = time.perf_counter()
                r = session.post(f"{url}/txt2img", json={**body, "seed": seed}, timeout=3600)
                ok = r.status_code == 200 and r.json()["info"].count(f"Seed: {seed},") == 1
                out.append((time.perf_counter() - t0, ok))
        return out

    progress_times, done = [], threading.Event()

    def poll() -> None:
        with requests.Session() as session:
            while not done.is_set():
                t0 = time.perf_counter()
                session.get(f"{url}/progress", timeout=10).raise_for_status()
                progress_times.append(time.perf_counter() - t0)
                time.sleep(0.05)

    poller = threading.Thread(target=poll)
    t0 = time.perf_counter()
    poller.start()
    with ThreadPoolExecutor(args.clients) as pool:
        results = [r for rs in pool.map(client, range(args.clients)) for r in rs]
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    server.should_exit = True
    latencies = np.array([t for t, _ in results])
    progress = np.array(progress_times) * 1000
    n = len(results)
    print(f"unfog serve, shapes model, 64 px, {args.steps} steps, Euler a, preview every {args.preview_every} steps; "
          f"{args.clients} clients x {args.requests} requests; torch {torch.__version__}, {torch.get_num_threads()} threads; CPU flags: {cpu_flags()}\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| requests completed with their seed | {sum(ok for _, ok in results)} / {n} |")
    print(f"| throughput | {n / wall:.2f} requests/s ({wall:.1f} s in all) |")
    for q in (50, 90, 99):
        print(f"| request latency p{q} | {np.percentile(latencies, q):.2f} s |")
    print(f"| /progress answers during the run | {len(progress)} |")
    for q in (50, 99):
        print(f"| /progress latency p{q} | {np.percentile(progress, q):.1f} ms |")
    print(f"| /progress latency max | {progress.max():.1f} ms |")


if __name__ == "__main__":
    main()
