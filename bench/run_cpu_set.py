"""The CPU set (``make bench``): the benchmarks that take seconds to a minute each on a 2-core CPU, run one
after the other with small counts, each printing its own report; then one summary table of their headline
figures. The others (full-size SDXL, the demo model's judge) are too long for it: see bench/README.md.

    .venv/bin/python bench/run_cpu_set.py [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, SUMMARY_FILE_VARIABLE, Table, report

BENCH = REPO / "bench"

# (script, its arguments): small counts, so the whole set takes a few minutes on 2 idle cores.
CPU_SET: list[tuple[str, list[str]]] = [
    ("service_overhead", ["--jobs", "20", "--seconds", "3"]),
    ("distributed_throughput", ["--jobs", "12", "--latency-jobs", "10"]),
    ("fair_queue_wait", ["--jobs", "20"]),
    ("sse_latency", ["--streams", "200", "--rounds", "2"]),
    ("redis_memory", ["--jobs", "100"]),
    ("upload_storage", ["--uploads", "2"]),
    ("switch_times", []),
    ("preview_overhead", ["--runs", "3"]),
    ("service_vs_diffusers", ["--job", "full", "--runs", "3", "--threads", "1"]),
    ("batch_and_img2img_memory", ["--steps", "10", "--runs", "1"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [name for name, _ in CPU_SET]
    parser.add_argument("--only", action="append", choices=names, help="run this one (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the commands and exit")
    args = parser.parse_args()
    chosen = [(name, arguments) for name, arguments in CPU_SET if not args.only or name in args.only]
    if args.list:
        for name, arguments in chosen:
            print(" ".join([".venv/bin/python", f"bench/{name}.py", *arguments]))
        return 0
    rows: list[list[object]] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="imagen-bench-summary-") as tmp:
        summary = Path(tmp) / "headlines.jsonl"
        env = {**os.environ, SUMMARY_FILE_VARIABLE: str(summary)}
        for name, arguments in chosen:
            command = [sys.executable, str(BENCH / f"{name}.py"), *arguments]
            print(f"$ {' '.join(['python', f'bench/{name}.py', *arguments])}", flush=True)
            started = time.monotonic()
            code = subprocess.run(command, env=env, cwd=REPO, check=False).returncode
            seconds = f"{time.monotonic() - started:.0f}"
            lines = summary.read_text().splitlines() if summary.exists() else []
            summary.unlink(missing_ok=True)
            if code != 0:
                failed.append(name)
                rows.append([name, f"**failed** (exit {code})", "", "", seconds])
                continue
            for index, line in enumerate(lines):
                figure = json.loads(line)
                rows.append([name if index == 0 else "", figure["what"], figure["value"], figure["target"] or "—",
                             seconds if index == 0 else ""])
    report("CPU set summary", Table(["benchmark", "figure", "value", "target", "run (s)"], rows),
           notes=[f"failed: {', '.join(failed)}"] if failed else [])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
