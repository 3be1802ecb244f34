"""`taskmeter recommend` from a ledger of real measured tasks: the numbers equal the
formulas computed independently here, the Kustomize patch applies, bad input fails
cleanly and writes nothing."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import taskmeter
from taskmeter.demo.vcfgen import generate_vcf
from taskmeter.export.ledger import Ledger
from taskmeter.measure.report import (
    ProcessStats,
    SamplerInfo,
    TaskReport,
    ToolRun,
    ToolTotals,
    WorkerInfo,
    iso_utc,
)
from taskmeter.sizing import render
from taskmeter.sizing.recommend import Options, recommend
from taskmeter.sizing.stats import TaskStats

from helpers import burn_child, child, require, strict

MiB = 2**20
T0 = 1_764_000_000.0
TM = [sys.executable, "-m", "taskmeter.cli"]


def tm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TM, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """25 bcftools tasks, 25 CPU tasks and 20 memory tasks, one with a SIGKILLed tool,
    measured for real and written by the real Ledger. Without bcftools (locally) the
    bcftools tasks are left out, not the tests: they need only the ledger."""
    tmp = tmp_path_factory.mktemp("sizing")
    with_vcf = strict() or shutil.which("bcftools") is not None
    if with_vcf:
        require("bcftools")  # under CI: fails when it is missing
        vcf = generate_vcf(tmp / "in.vcf.gz", samples=30, variants=3_000, seed=5)
    path = tmp / "ledger.jsonl"
    with Ledger(path) as led:
        for _ in range(25 if with_vcf else 0):
            with taskmeter.measure("vcf.query", on_report=led.write):
                taskmeter.run(["bcftools", "query", "-f", "%POS\\n", str(vcf)],
                              capture_output=True, check=True)  # fmt: skip
        for _ in range(25):
            with taskmeter.measure("cpu.burn", on_report=led.write):
                taskmeter.run(burn_child(0.02), check=True)
        for i in range(20):
            with taskmeter.measure("mem.hold", on_report=led.write):
                mib = 300 if i == 7 else 20  # one spike
                hold = f"b = b'x' * ({mib} << 20)\nprint('held', flush=True)\ninput()"
                proc = taskmeter.Popen(child(hold), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
                time.sleep(0.05)
                if i == 3:
                    proc.send_signal(signal.SIGKILL)  # as the OOM killer would
                else:
                    proc.terminate()
                proc.communicate()
    return path


def independent(lines: list[dict], n: int, parent: int, margin: float) -> dict:
    """The formulas of the issue, from the raw JSON lines, without taskmeter's code."""
    by: dict[str, list[dict]] = {}
    for d in lines:
        by.setdefault(d["task"], []).append(d)

    def typical(rs: list[dict]) -> float:
        ov = sum(r["overhead"]["rss_avg_bytes"] for r in rs) / len(rs)
        tool_avgs = []
        for r in rs:
            if r["tools"]:
                wall = sum(t["wall_s"] for t in r["tools"])
                tool_avgs.append(sum(t["rss_avg_bytes"] * t["wall_s"] for t in r["tools"]) / wall)
        return ov + (sum(tool_avgs) / len(tool_avgs) if tool_avgs else 0.0)

    request = (n * max(typical(rs) for rs in by.values()) + parent) * (1 + margin)
    limit = (n * max(r["footprint_peak_bytes"] for r in lines) + parent) * (1 + margin)
    kills = sum(r["state"] == "killed" for r in lines) + sum(
        t["signal"] == 9 for r in lines for t in r["tools"]
    )
    # The VPA's OOM bump only for tasks the OOM killer (or an unknown cause) ended, lost
    # tasks and OOM-killed tools; not for a plain SIGKILL of a tool.
    oom = [r for r in lines if r.get("cause") in ("oom", "unknown") or r["state"] == "lost"
           or any(t.get("cause") == "oom" for t in r["tools"])]  # fmt: skip
    if oom:
        limit = max(limit * 1.2, limit + 100 * MiB)
    busy = max(sum(r["cpu_s"] for r in rs) / sum(r["wall_s"] for r in rs) for rs in by.values())
    overhead_wall = {
        task: sum(r["overhead"]["wall_s"] for r in rs) / sum(r["wall_s"] for r in rs)
        for task, rs in by.items()
    }
    return {
        "overhead_wall_share": overhead_wall,
        "memory_request_bytes": math.ceil(request),
        "memory_limit_bytes": math.ceil(max(limit, request)),
        "cpu_request_millicores": max(10, math.ceil(n * busy * 100 - 1e-9) * 10),
        "max_memory_per_child_kib": math.ceil(
            max(r["overhead"]["rss_peak_bytes"] for r in lines) * (1 + margin) / 1024
        ),
        "kills": kills,
    }


def test_recommendation_equals_the_formulas(ledger: Path):
    out = tm("recommend", "--ledger", str(ledger), "--concurrency", "2",
             "--parent-memory", "150Mi", "--margin", "0.25", "--format", "json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    lines = [json.loads(x) for x in ledger.read_text().splitlines()]
    want = independent(lines, n=2, parent=150 * MiB, margin=0.25)
    assert want["kills"] == 1  # SIGTERMed tools are not kills; the SIGKILLed one is
    for key in ("memory_request_bytes", "memory_limit_bytes", "cpu_request_millicores",
                "max_memory_per_child_kib"):  # fmt: skip
        assert got[key] == want[key], key
    req = got["resources"]["requests"]["memory"]
    assert (
        req.endswith(("Mi", "Gi"))
        and int(req[:-2]) * (1024 if req.endswith("Gi") else 1) * MiB
        >= want["memory_request_bytes"]
    )
    assert got["celery_flags"] == ["--concurrency", "2", "--max-memory-per-child",
                                   str(want["max_memory_per_child_kib"])]  # fmt: skip
    # The SIGKILLed tool is a kill, not an OOM kill: said, and the limit is not raised.
    assert not any("VPA" in r for r in got["reasoning"])
    assert any("1 tool run(s) ended by a signal not from the OOM killer" in n
               for n in got["notes"])  # fmt: skip
    assert got["pool"] == "prefork" and "sized as prefork" in out.stderr
    shares = {t["task"]: t["overhead_wall_share"] for t in got["tasks"]}
    assert shares.keys() == want["overhead_wall_share"].keys()
    for task, share in want["overhead_wall_share"].items():
        assert shares[task] == pytest.approx(share, rel=1e-9), task
    assert all(0 < v < 1 for v in shares.values()), shares
    assert any("mem.hold is spiky" in n for n in got["notes"])


def test_table_shows_the_reasoning_and_concurrency_comes_from_the_data(ledger: Path):
    out = tm("recommend", "--ledger", str(ledger))
    assert out.returncode == 0, out.stderr
    assert "concurrency 1: the most tasks seen running at once" in out.stderr
    assert "memory request = (1 x" in out.stdout and "--max-memory-per-child" in out.stdout


def test_kustomize_patch_applies_to_a_base_deployment(ledger: Path, tmp_path: Path):
    kubectl = require("kubectl")  # it bundles Kustomize
    patch = tmp_path / "overlay" / "resources.yaml"
    patch.parent.mkdir()
    out = tm("recommend", "--ledger", str(ledger), "--concurrency", "2", "--format",
             "kustomize", "--deployment", "divbase-worker", "--container", "celery",
             "-o", str(patch))  # fmt: skip
    assert out.returncode == 0, out.stderr
    base = tmp_path / "base"
    base.mkdir()
    (base / "deployment.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "divbase-worker"},
        "spec": {"selector": {"matchLabels": {"app": "w"}}, "template": {
            "metadata": {"labels": {"app": "w"}},
            "spec": {"containers": [{"name": "celery", "image": "divbase:1"},
                                    {"name": "sidecar", "image": "busybox"}]}}},
    }))  # fmt: skip
    (base / "kustomization.yaml").write_text("resources: [deployment.yaml]\n")
    (patch.parent / "kustomization.yaml").write_text(
        "resources: [../base]\npatches:\n  - path: resources.yaml\n"
    )
    built = subprocess.run([kubectl, "kustomize", str(patch.parent)], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    containers = yaml.safe_load(built)["spec"]["template"]["spec"]["containers"]
    celery = next(c for c in containers if c["name"] == "celery")
    sidecar = next(c for c in containers if c["name"] == "sidecar")
    rec = json.loads(tm("recommend", "--ledger", str(ledger), "--concurrency", "2",
                        "--format", "json").stdout)  # fmt: skip
    assert celery["resources"] == rec["resources"]
    assert celery["image"] == "divbase:1" and "resources" not in sidecar


def test_bad_input_fails_clearly_and_writes_nothing(ledger: Path, tmp_path: Path):
    out_file = tmp_path / "out.yaml"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--ledger", str(empty)], "no tasks in the data"),
        (["--ledger", str(ledger), "--task", "nope"], "no data for task(s) nope"),
        (["--ledger", str(ledger), "--margin", "-0.1"], "Invalid value for '--margin'"),
        (["--ledger", str(ledger), "--min-tasks", "100"], "too few tasks"),
        (["--prometheus", "http://127.0.0.1:9"], "127.0.0.1:9"),
        ([], "give either --ledger"),
    ]
    for args, message in cases:
        out = tm("recommend", *args, "--concurrency", "2", "--format", "kustomize",
                 "-o", str(out_file))  # fmt: skip
        assert out.returncode != 0, args
        assert message in out.stderr, (args, out.stderr)
        assert not out_file.exists(), args


def test_a_malformed_line_is_reported_with_file_and_line_and_the_rest_used(
    ledger: Path, tmp_path: Path
):
    broken = tmp_path / "broken.jsonl"
    lines = ledger.read_text().splitlines()
    bad = json.loads(lines[0])
    bad["wall_s"] = -1.0  # a record of our schema with an impossible value
    broken.write_text("\n".join([*lines[:5], json.dumps(bad), *lines[5:]]) + "\n")
    out = tm("recommend", "--ledger", str(broken), "--concurrency", "2", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert f"{broken}:6:" in out.stderr
    good = tm("recommend", "--ledger", str(ledger), "--concurrency", "2", "--format", "json")
    assert (
        json.loads(out.stdout)["memory_limit_bytes"]
        == json.loads(good.stdout)["memory_limit_bytes"]
    )


# -- pools, OOM kills, strict JSON: records built here, figures known exactly ----------------
def record(task: str, avg_mib: float, peak_mib: float, *, pool: str | None, start: float,
           wall: float = 1.0, state: str = "success", cause: str | None = None,
           tool_avg_mib: float = 0, tool_peak_mib: float = 0,
           tool_cause: str | None = None) -> TaskReport:  # fmt: skip
    """One task: worker RSS average/peak, optionally one tool; the footprint is the
    worker's peak plus the tool's."""
    tools: tuple[ToolRun, ...] = ()
    if tool_peak_mib:
        tools = (ToolRun(argv=("bcftools",), exe="/usr/bin/bcftools", pid=1, exit_code=None
                         if tool_cause else 0, signal=9 if tool_cause else None, start_s=0.1,
                         end_s=wall / 2, wall_s=wall / 2 - 0.1, cpu_s=0.2, user_s=0.2,
                         sys_s=0.0, rss_avg_bytes=int(tool_avg_mib * MiB),
                         rss_peak_bytes=int(tool_peak_mib * MiB), peak_method="hwm", samples=5,
                         read_bytes=0, write_bytes=0, cause=tool_cause),)  # type: ignore[arg-type]  # fmt: skip
    return TaskReport(
        task=task, task_id=None, state=state, started_at=iso_utc(start),  # type: ignore[arg-type]
        ended_at=iso_utc(start + wall), wall_s=wall, cpu_s=0.5,
        overhead=ProcessStats(wall_s=wall, cpu_s=0.3, user_s=0.3, sys_s=0.0,
                              rss_avg_bytes=int(avg_mib * MiB),
                              rss_peak_bytes=int(peak_mib * MiB), peak_method="hwm"),
        tools=tools, tool_totals=ToolTotals.of(tools),
        footprint_peak_bytes=int((peak_mib + tool_peak_mib) * MiB), phases=(),
        unattributed_child_cpu_s=0.0, worker=WorkerInfo("w1", 1, pool),
        sampler=SamplerInfo(0.1), cause=cause,  # type: ignore[arg-type]
    )  # fmt: skip


def write_ledger(path: Path, records: list[TaskReport]) -> Path:
    path.write_text("".join(r.to_json() + "\n" for r in records))
    return path


def recommend_json(*args: str) -> dict:
    out = tm("recommend", *args, "--format", "json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout, parse_constant=_not_json))


def _not_json(name: str) -> None:
    raise AssertionError(f"{name} is not JSON")


def test_the_seeds_example_solo_and_prefork_without_parent(tmp_path: Path):
    """worker_metrics.md: average 600 MiB, peak 900 MiB, 20 % margin -> 720Mi / 1080Mi."""

    def tasks(pool: str) -> list[TaskReport]:
        return [record("vcf.merge", 600, 900, pool=pool, start=T0 + 10 * i) for i in range(20)]

    solo = recommend_json("--ledger", str(write_ledger(tmp_path / "solo.jsonl", tasks("solo"))))
    assert solo["resources"]["requests"]["memory"] == "720Mi"
    assert solo["resources"]["limits"]["memory"] == "1080Mi"
    assert solo["pool"] == "solo" and solo["celery_flags"] == ["--pool", "solo"]
    assert solo["max_memory_per_child_kib"] is None
    assert not any("parent" in line for line in solo["reasoning"])
    prefork = recommend_json("--ledger", str(write_ledger(tmp_path / "p.jsonl", tasks("prefork"))),
                             "--parent-memory", "0")  # fmt: skip
    assert prefork["resources"]["requests"]["memory"] == "720Mi"
    assert prefork["resources"]["limits"]["memory"] == "1080Mi"
    assert prefork["celery_flags"][:2] == ["--concurrency", "1"]
    assert "--max-memory-per-child" in prefork["celery_flags"]
    # --pool solo on prefork records: the same pod as the solo records.
    forced = recommend_json("--ledger", str(tmp_path / "p.jsonl"), "--pool", "solo")
    assert forced["resources"] == solo["resources"]


def test_threads_count_the_process_once_and_the_tools_of_n_tasks(tmp_path: Path):
    # Two task types; 4 threads. The worker process's RSS is shared by the threads.
    recs = [record("a", 300, 400, pool="threads", start=T0 + i, tool_avg_mib=100,
                   tool_peak_mib=150) for i in range(20)]  # fmt: skip
    recs += [record("b", 350, 380, pool="threads", start=T0 + i, tool_avg_mib=20,
                    tool_peak_mib=30) for i in range(20)]  # fmt: skip
    got = recommend_json("--ledger", str(write_ledger(tmp_path / "t.jsonl", recs)),
                         "--concurrency", "4")  # fmt: skip
    request = (350 + 4 * 100) * MiB * 1.2
    limit = max(400 + 4 * 150, 400 + 150) * MiB * 1.2
    assert got["memory_request_bytes"] == math.ceil(request)
    assert got["memory_limit_bytes"] == math.ceil(limit)
    assert got["celery_flags"] == ["--pool", "threads", "--concurrency", "4"]
    assert got["max_memory_per_child_kib"] is None


def test_mixed_pools_are_refused_unless_one_is_chosen(tmp_path: Path):
    recs = [record("a", 100, 120, pool="prefork", start=T0 + i) for i in range(20)]
    recs += [record("a", 500, 900, pool="solo", start=T0 + i) for i in range(20)]
    ledger = write_ledger(tmp_path / "mixed.jsonl", recs)
    out = tm("recommend", "--ledger", str(ledger))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "mixes workers of different pools (prefork: 20 task records, solo: 20" in out.stderr
    solo = recommend_json("--ledger", str(ledger), "--pool", "solo")
    assert solo["resources"]["limits"]["memory"] == "1080Mi"  # only the solo records
    prefork = recommend_json("--ledger", str(ledger), "--pool", "prefork", "--parent-memory", "0")
    assert prefork["memory_limit_bytes"] == math.ceil(120 * MiB * 1.2)


@pytest.mark.parametrize(
    ("kind", "bumped"),
    [("oom", True), ("lost", True), ("unknown", True), ("tool_oom", True),
     ("time_limit", False), ("signal", False)],
)  # fmt: skip
def test_oom_killed_and_lost_tasks_raise_the_limit_as_the_vpa_does(tmp_path: Path, kind, bumped):
    recs = [record("a", 100, 200, pool="solo", start=T0 + i, tool_avg_mib=50, tool_peak_mib=100)
            for i in range(20)]  # fmt: skip
    last = {"start": T0 + 30, "tool_avg_mib": 50, "tool_peak_mib": 100}
    if kind == "tool_oom":
        recs.append(record("a", 100, 200, pool="solo", state="failure", tool_cause="oom", **last))
    elif kind == "lost":
        recs.append(record("a", 100, 200, pool="solo", state="lost", cause="unknown", **last))
    else:
        recs.append(record("a", 100, 200, pool="solo", state="killed", cause=kind, **last))
    got = recommend_json("--ledger", str(write_ledger(tmp_path / "k.jsonl", recs)))
    footprint = 300 * MiB
    want = max(footprint * 1.2, footprint + 100 * MiB) if bumped else footprint
    assert got["memory_limit_bytes"] == math.ceil(want * 1.2), kind
    assert got["tasks"][0]["oom_bumped"] is bumped
    assert any("VPA" in line for line in got["reasoning"]) is bumped
    if kind == "time_limit":
        assert any("1 task(s) killed by a time limit" in n for n in got["notes"])
    table = tm("recommend", "--ledger", str(tmp_path / "k.jsonl"))
    assert ("as the VPA does" in " ".join(table.stdout.split())) is bumped


def test_json_output_is_strict_even_with_non_finite_figures():
    stats = {"a": TaskStats(task="a", runs=20, runs_by_state={"success": 20}, kills=0,
                            wall_sum_s=20.0, wall_overhead_sum_s=20.0, wall_tool_sum_s=0.0,
                            cpu_overhead_sum_s=10.0, cpu_tool_sum_s=0.0,
                            mem_overhead_avg_mean_bytes=100.0 * MiB, mem_tool_avg_mean_bytes=0.0,
                            mem_overhead_avg_quantile_bytes=None, mem_tool_avg_quantile_bytes=None,
                            overhead_peak_max_bytes=200 * MiB, footprint_max_bytes=200 * MiB,
                            footprint_median_bytes=math.nan)}  # fmt: skip
    rec = recommend(stats, Options(concurrency=1, parent_bytes=0))
    text = render.as_json(rec)
    data = json.loads(text, parse_constant=_not_json)
    assert data["tasks"][0]["footprint_median_bytes"] is None
    assert render.strict({"x": [math.inf, -math.inf, 1.5]}) == {"x": [None, None, 1.5]}
