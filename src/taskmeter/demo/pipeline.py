"""A DivBase-style VCF task, measured: fetch a VCF, subset it with bcftools, query it.

This is the measurement core on its own (no Celery, no S3 yet): each task runs in this
process under ``taskmeter.measure``, with the same bcftools commands run alone beside
it, so the worker's overhead can be compared with "just running bcftools".
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import taskmeter
from taskmeter.demo.vcfgen import generate_vcf, sample_names
from taskmeter.measure.report import TaskReport

# (samples, variants): a grid from small to a few tens of MB uncompressed.
DEFAULT_GRID: tuple[tuple[int, int], ...] = ((50, 5_000), (200, 20_000), (500, 40_000))


@dataclass(frozen=True)
class DemoResult:
    vcf: Path
    samples: int
    variants: int
    report: TaskReport
    bcftools_alone_wall_s: float


class DemoError(RuntimeError):
    """Something the user must fix before the demo can run (it says what)."""


def require_bcftools() -> None:
    missing = [t for t in ("bcftools", "bgzip") if shutil.which(t) is None]
    if missing:
        raise DemoError(
            f"{' and '.join(missing)} not found on PATH. Install them with "
            "`make setup` (Debian: apt-get install bcftools tabix)."
        )


def bcftools_steps(src: Path, out_dir: Path, samples: int) -> list[list[str]]:
    """The task's tool runs: subset samples and a region, index it, query genotypes."""
    subset = ",".join(sample_names(samples)[: max(1, samples // 2)])
    subset_vcf = out_dir / f"{src.name.removesuffix('.vcf.gz')}.subset.vcf.gz"
    return [
        ["bcftools", "view", "-s", subset, "-r", "chr1:1-2000000", "-Oz", "-o",
         str(subset_vcf), str(src)],
        ["bcftools", "index", "-f", str(subset_vcf)],
        ["bcftools", "query", "-f", r"%CHROM\t%POS\t%REF\t%ALT[\t%GT]\n", "-o",
         str(out_dir / "genotypes.tsv"), str(subset_vcf)],
    ]  # fmt: skip


def run_task(src: Path, bucket: Path, work: Path, samples: int) -> TaskReport:
    """One task as a worker would run it, measured."""
    work.mkdir(parents=True, exist_ok=True)
    with taskmeter.measure("vcf.subset_query", task_id=src.name) as m:
        with m.phase("download"):
            local = work / src.name
            shutil.copyfile(bucket / src.name, local)
            shutil.copyfile(bucket / (src.name + ".csi"), work / (src.name + ".csi"))
        with m.phase("check"):
            header = taskmeter.run(
                ["bcftools", "view", "-h", str(local)], capture_output=True, text=True, check=True
            ).stdout
            if "##fileformat=VCF" not in header:
                raise DemoError(f"{src} is not a VCF")
        for argv in bcftools_steps(local, work, samples):
            taskmeter.run(argv, check=True)
    return m.report


def bcftools_alone(src: Path, work: Path, samples: int) -> float:
    """Wall time of the same bcftools commands with no worker around them."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    for argv in bcftools_steps(src, work, samples):
        subprocess.run(argv, check=True)
    return time.monotonic() - t0


def run_demo(
    workdir: Path,
    grid: tuple[tuple[int, int], ...] = DEFAULT_GRID,
    progress: Callable[[str], None] = lambda _: None,
) -> list[DemoResult]:
    require_bcftools()
    bucket = workdir / "bucket"
    bucket.mkdir(parents=True, exist_ok=True)
    results = []
    for samples, variants in grid:
        name = f"cohort_{samples}x{variants}.vcf.gz"
        path = bucket / name
        if not path.exists():
            progress(f"generating {name}")
            generate_vcf(path, samples=samples, variants=variants, seed=samples)
        progress(f"running the task on {name}")
        report = run_task(path, bucket, workdir / "task" / name, samples)
        alone = bcftools_alone(path, workdir / "alone" / name, samples)
        results.append(DemoResult(path, samples, variants, report, alone))
    return results
