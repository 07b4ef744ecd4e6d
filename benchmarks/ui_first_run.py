"""What a newcomer waits for: `attnpack ui` from start to answering, then each tab's first generation with its
defaults (the model each tab opens on, the examples' prompts, every option left as it is), through the named API.

    python benchmarks/ui_first_run.py          # -> results/ui_first_run.json (never overwrites it: --force)

Runs `python -m attnpack ui` on a free local port (127.0.0.1 only) in a child process and stops it at the end.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request


# each tab's first request: what a newcomer types (the tab's example), everything else left at its default
REQUESTS = {
    "Generate": ("/generate", dict(prompt="a red circle left of a blue square")),
    "Head guidance": ("/head_guidance", dict(prompt="a red circle left of a blue square")),
    "IR-Diffusion": ("/ir_diffusion", dict(scene="a red circle left of a blue square")),
    "A-STAR": ("/astar", dict(prompt="a red circle left of a blue square", concepts="circle, square")),
    "Benchmarks / Info": ("/benchmark", dict()),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the UI to answer")


def run(args: argparse.Namespace) -> dict:
    from gradio_client import Client

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnpack", "ui", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    results: dict = {}
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"attnpack ui exited with status {proc.returncode} before answering")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - start > args.timeout:
                raise SystemExit(f"attnpack ui did not answer within {args.timeout:.0f} s")
            time.sleep(0.5)
        results["start_to_answer_s"] = round(time.perf_counter() - start, 2)
        print(f"UI answering after {results['start_to_answer_s']} s", file=sys.stderr)
        client = Client(url, verbose=False)
        tabs = {}
        for tab, (api_name, kwargs) in REQUESTS.items():
            t0 = time.perf_counter()
            try:
                client.predict(**kwargs, api_name=api_name)
                tabs[tab] = {"endpoint": api_name, "seconds": round(time.perf_counter() - t0, 2), "ok": True}
            except Exception as exc:  # a failing tab is a finding, recorded as such
                tabs[tab] = {"endpoint": api_name, "seconds": None, "ok": False, "error": str(exc)[:300]}
            print(f"{tab}: {tabs[tab]}", file=sys.stderr)
        results["first_generation"] = tabs
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return results


def exit_status(result: dict) -> int:
    """1 when a tab failed (the JSON is written all the same: a failing tab is a finding)."""
    return 0 if all(t["ok"] for t in result["first_generation"].values()) else 1


if __name__ == "__main__":
    from _registry import main

    sys.exit(main("ui_first_run", module=sys.modules[__name__]))
