"""The bcftools command lines of the demo's task types, shared by the Celery tasks
(``taskmeter.demo.app``) and the "bcftools alone" runs of ``taskmeter demo``, so both
run exactly the same tools on the same kind of local files.

Task types (DivBase-style):

* ``vcf.subset_query``: ``bcftools view`` a sample subset and a region, index the
  subset, ``bcftools query`` its genotypes to a TSV (uploaded).
* ``vcf.merge``: split the region into two sample halves (two ``bcftools view``), index
  both, ``bcftools merge`` them back into one file (uploaded) and index it.

No Celery, S3 or taskmeter import here: plain data in, argv lists out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SUBSET_QUERY = "vcf.subset_query"
MERGE = "vcf.merge"
KINDS = (SUBSET_QUERY, MERGE)
QUERY_FORMAT = r"%CHROM\t%POS\t%REF\t%ALT[\t%GT]\n"


@dataclass(frozen=True)
class Plan:
    """The tool runs of one task, in order, and the file the task uploads."""

    argvs: list[list[str]]
    output: Path


def _stem(src: Path) -> str:
    name = src.name
    for suffix in (".vcf.gz", ".vcf.bgz", ".bcf", ".vcf"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def subset_query(src: Path, work: Path, samples: list[str], region: str) -> Plan:
    """Subset samples and a region, index the subset, query its genotypes."""
    subset = work / f"{_stem(src)}.subset.vcf.gz"
    tsv = work / f"{_stem(src)}.genotypes.tsv"
    view = ["bcftools", "view"]
    if samples:
        view += ["-s", ",".join(samples)]
    view += ["-r", region, "-Oz", "-o", str(subset), str(src)]
    return Plan(
        [
            view,
            ["bcftools", "index", "-f", str(subset)],
            ["bcftools", "query", "-f", QUERY_FORMAT, "-o", str(tsv), str(subset)],
        ],
        tsv,
    )


def merge(src: Path, work: Path, samples: list[str], region: str) -> Plan:
    """Two sample halves of a region, each indexed, merged back with ``bcftools merge``."""
    if len(samples) < 2:
        raise ValueError("vcf.merge needs a VCF with at least 2 samples")
    half = len(samples) // 2
    parts = [work / f"{_stem(src)}.part{i}.vcf.gz" for i in (1, 2)]
    merged = work / f"{_stem(src)}.merged.vcf.gz"
    argvs: list[list[str]] = []
    for part, subset in zip(parts, (samples[:half], samples[half:]), strict=True):
        argvs.append(["bcftools", "view", "-s", ",".join(subset), "-r", region, "-Oz",
                      "-o", str(part), str(src)])  # fmt: skip
        argvs.append(["bcftools", "index", "-f", str(part)])
    argvs.append(["bcftools", "merge", "-Oz", "-o", str(merged), *map(str, parts)])
    argvs.append(["bcftools", "index", "-f", str(merged)])
    return Plan(argvs, merged)


def plan(kind: str, src: Path, work: Path, samples: list[str], region: str) -> Plan:
    if kind == SUBSET_QUERY:
        return subset_query(src, work, samples, region)
    if kind == MERGE:
        return merge(src, work, samples, region)
    raise ValueError(f"unknown task type {kind!r} (known: {', '.join(KINDS)})")
