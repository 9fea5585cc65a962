"""Shared by the train-step benchmarks (ours and the PyTorch baselines): batch parsing, one child
process per configuration (so every peak-memory figure is that configuration's own and an OOM or a
crash costs one row, not the run), the result table and the JSON file.

A child is this same script re-run with ``--_child CONFIG_JSON --_out RESULT_JSON``; it writes one
result dict. The parent streams its output (progress), enforces ``--timeout`` and records
``status`` = ``ok`` | ``oom`` | ``error`` | ``timeout`` | ``crashed``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GiB = 2**30
REPO = Path(__file__).resolve().parents[1]
MIN_CONFIG_S = 30.0  # no configuration starts with less of the overall budget left
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemoryError", "OOM")


def parse_batches(text: str) -> list[tuple[int, int]]:
    """``"4x512,1x2048"`` -> ``[(4, 512), (1, 2048)]``."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            b, t = item.split("x")
            out.append((int(b), int(t)))
        except ValueError:
            raise SystemExit(f"error: batch {item!r} is not of the form BxT (e.g. 4x512)") from None
        if out[-1][0] <= 0 or out[-1][1] <= 1:
            raise SystemExit(f"error: batch {item!r} needs B >= 1 and T >= 2")
    if not out:
        raise SystemExit("error: --batch is empty")
    return out


def is_oom(text: str) -> bool:
    return any(m in text for m in OOM_MARKERS)


def gpu_total_bytes() -> int | None:
    """Total memory of GPU 0 from ``nvidia-smi`` (None without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return int(float(out.stdout.strip().splitlines()[0])) * 2**20


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def run_configs(script: Path, configs: list[dict[str, Any]], *, timeout: float, budget_s: float | None,
                env: dict[str, str] | None = None,
                retry: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any] | None] | None = None,
                ) -> list[dict[str, Any]]:
    """Run every configuration in its own child, each with at most ``timeout`` seconds and none
    starting with less than ``MIN_CONFIG_S`` of the overall ``budget_s`` left (those are recorded as
    ``skipped``). ``retry(config, result)`` may return another configuration to run, as its own row,
    with what is left of the failed one's time."""
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for i, c in enumerate(configs):
        limit = timeout
        if budget_s is not None:  # a hard deadline for the whole invocation
            remaining = budget_s - (time.perf_counter() - start)
            if remaining < MIN_CONFIG_S:
                print(f"[{c['name']}] skipped: {remaining:.0f}s of the {budget_s:.0f}s budget left", flush=True)
                results.append({**c, "status": "skipped"})
                continue
            limit = min(limit, remaining)
        print(f"== {i + 1}/{len(configs)} {c['name']} (timeout {limit:.0f}s) ==", flush=True)
        t_child = time.perf_counter()
        r = run_child(script, c, timeout=limit, env=env)
        if r["status"] != "ok":
            print(f"[{c['name']}] {r['status']}: {r.get('error', '')[-500:]}", flush=True)
        results.append(r)
        c2 = retry(c, r) if retry is not None else None
        if c2 is not None:
            left = limit - (time.perf_counter() - t_child)
            if budget_s is not None:
                left = min(left, budget_s - (time.perf_counter() - start))
            if left >= MIN_CONFIG_S:
                print(f"== {c2['name']}: retrying (timeout {left:.0f}s) ==", flush=True)
                results.append(run_child(script, c2, timeout=left, env=env))
    return results


def run_child(script: Path, config: dict[str, Any], *, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script --_child`` for one configuration; its result dict, or a failure record."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "result.json"
        cfg_path.write_text(json.dumps(config))
        cmd = [sys.executable, str(script), "--_child", str(cfg_path), "--_out", str(out_path)]
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), child_env.get("PYTHONPATH", "")) if p)
        tail: deque[str] = deque(maxlen=40)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env,
                                bufsize=1)
        status = None

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write("    | " + line)
                sys.stdout.flush()
                tail.append(line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = "timeout"
        reader.join(timeout=10)
        wall = time.perf_counter() - t0
        if status is None and out_path.is_file():
            result = json.loads(out_path.read_text())
            result.setdefault("wall_s", wall)
            return result
        text = "\n".join(tail)
        if status is None:
            status = "oom" if is_oom(text) else "crashed"
        return {**config, "status": status, "wall_s": wall,
                "error": f"exit code {proc.returncode}; last output:\n{text[-2000:]}"}


def add_runner_args(ap: argparse.ArgumentParser) -> None:
    """The options every benchmark that runs its configurations through :func:`run_configs` takes: the
    per-configuration timeout, the overall budget, the JSON output, and the hidden child-process ones
    (:func:`child_main`)."""
    ap.add_argument("--timeout", type=float, default=300, help="seconds per configuration")
    ap.add_argument("--budget-s", type=float, help="hard deadline (s) for all configurations: each gets at most what is left, none starts with < 30 s")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)


def child_main(run_one: Callable[[dict[str, Any]], dict[str, Any]], cfg_path: str, out_path: str) -> int:
    """Body of ``--_child``: run one configuration, write its result (OOM and errors included)."""
    config = json.loads(Path(cfg_path).read_text())
    try:
        result = run_one(config)
    except Exception as e:  # reported as a table row; the traceback goes to the log
        import traceback

        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}"
        result = {**config, "status": "oom" if is_oom(msg) else "error", "error": msg[:2000]}
    Path(out_path).write_text(json.dumps(result, indent=2, default=str))
    return 0


def meta(argv: list[str]) -> dict[str, Any]:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "argv": argv,
    }


def median_seconds(fn: Callable[..., Any], *args: Any, runs: int) -> float:
    """Median wall-clock seconds of ``fn(*args)`` over ``runs`` calls, after two untimed ones (compile, warm-up)."""
    import jax

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def gib(x: Any) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def print_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, Callable[[dict], str]]]) -> str:
    """A markdown table (printed, and returned)."""
    lines = [f"\n{title}\n", "| " + " | ".join(c for c, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(f(r) for _, f in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {p}", flush=True)
