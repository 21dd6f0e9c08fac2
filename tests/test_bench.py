"""The benchmarks: each one listed in bench/README.md and run by its name there, all printing through the
harness's one report (a table headed by machine, date and commit), and ``make bench``'s set made of them."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

BENCH = REPO / "bench"
SCRIPTS = sorted(path for path in BENCH.iterdir() if path.suffix in (".py", ".sh") and path.name != "harness.py")


def readme_rows() -> dict[str, str]:
    """bench/README.md's table: the script each row names, and the row."""
    rows = {}
    for line in (BENCH / "README.md").read_text().splitlines():
        found = re.match(r"\| `([\w.]+)` \|", line)
        if found:
            rows[found.group(1)] = line
    return rows


def test_the_readme_has_one_row_per_script_and_no_row_without_one() -> None:
    assert sorted(readme_rows()) == sorted(path.name for path in SCRIPTS)


def test_the_readme_commands_name_the_scripts_as_they_are_called() -> None:
    """Each row's command runs its own script (a renamed script would leave its old name behind)."""
    for name, row in readme_rows().items():
        assert f"bench/{name}" in row, row


def test_every_benchmark_prints_through_the_harness_report() -> None:
    """Each Python benchmark calls ``report`` from ``harness``, and none prints a table of its own."""
    for path in SCRIPTS:
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "harness" for alias in node.names}
        calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Name)}
        assert "report" in imported and "report" in calls, path.name
        assert "|---" not in path.read_text(), f"{path.name} prints a table of its own"


def test_the_cpu_set_runs_scripts_that_exist() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import run_cpu_set
    finally:
        sys.path.remove(str(BENCH))
    names = [name for name, _ in run_cpu_set.CPU_SET]
    assert names and all((BENCH / f"{name}.py").is_file() for name in names)
    assert "sdxl_speed" not in names and "demo_prompt_following" not in names  # too long for make bench


def test_a_benchmark_prints_its_table_under_machine_date_and_commit_and_hands_over_its_headlines(
    tmp_path: Path,
) -> None:
    """A real run of the service-overhead benchmark (two jobs, half a second of /status load)."""
    summary = tmp_path / "headlines.jsonl"
    env = {**os.environ, "BENCH_SUMMARY_FILE": str(summary)}
    out = subprocess.run(
        [sys.executable, str(BENCH / "service_overhead.py"), "--jobs", "2", "--seconds", "0.5", "--connections", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    head = next(line for line in lines if line.startswith("machine: "))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    assert re.fullmatch(rf"machine: .+ \(\d+ cores?\), .+ · date: \d{{4}}-\d\d-\d\d · commit: {commit}( dirty)?", head)
    table = lines[lines.index(head) + 2:]
    assert table[0] == "| what | measured | target |" and table[1] == "|---|---|---|"
    assert table[2].startswith("| POST /generate -> SUCCESS minus 200 ms generation (2 jobs) | median ")
    headlines = [json.loads(line) for line in summary.read_text().splitlines()]
    assert [(h["benchmark"], h["what"], h["target"]) for h in headlines] == [
        ("service_overhead", "service overhead per job (median)", "<= 15 ms"),
        ("service_overhead", "GET /status on one core", ">= 2,000/s"),
    ]
    assert re.fullmatch(r"\d+\.\d ms", headlines[0]["value"])
