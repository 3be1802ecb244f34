"""`taskmeter recommend` from a ledger of real measured tasks: the numbers equal the
formulas computed independently here, the Kustomize patch applies, bad input fails
cleanly and writes nothing."""

from __future__ import annotations

import json
import math
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

from helpers import burn_child, child, require

MiB = 2**20
TM = [sys.executable, "-m", "taskmeter.cli"]


def tm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TM, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """25 bcftools tasks, 25 CPU tasks and 20 memory tasks, one with a SIGKILLed tool,
    measured for real and written by the real Ledger."""
    require("bcftools")
    tmp = tmp_path_factory.mktemp("sizing")
    vcf = generate_vcf(tmp / "in.vcf.gz", samples=30, variants=3_000, seed=5)
    path = tmp / "ledger.jsonl"
    with Ledger(path) as led:
        for _ in range(25):
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
    if kills:
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
    assert any("VPA" in r for r in got["reasoning"]), "the OOM bump is explained"
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
        (["--ledger", str(ledger), "--margin", "-0.1"], "must be between 0 and 10"),
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
    broken.write_text("\n".join([*lines[:5], "{not json", *lines[5:]]) + "\n")
    out = tm("recommend", "--ledger", str(broken), "--concurrency", "2", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert f"{broken}:6:" in out.stderr
    good = tm("recommend", "--ledger", str(ledger), "--concurrency", "2", "--format", "json")
    assert (
        json.loads(out.stdout)["memory_limit_bytes"]
        == json.loads(good.stdout)["memory_limit_bytes"]
    )
