"""The synthetic VCF generator, checked with the real bcftools."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from taskmeter.demo.vcfgen import MissingToolError, generate_vcf, sample_names

from helpers import requires

# bcftools and bgzip (Debian packages bcftools, tabix): skip locally, fail under CI=true
needs_tools = requires("bcftools", "bgzip")

SAMPLES = 7
VARIANTS = 250
START = 1_000
SPACING = 50


def bcftools(*args: str | Path) -> str:
    done = subprocess.run(["bcftools", *map(str, args)], check=True, capture_output=True, text=True)
    return done.stdout


def records_md5(path: Path) -> str:
    return hashlib.md5(bcftools("view", "-H", path).encode()).hexdigest()


@pytest.fixture
def vcf(tmp_path: Path) -> Path:
    return generate_vcf(
        tmp_path / "cohort.vcf.gz",
        samples=SAMPLES,
        variants=VARIANTS,
        start=START,
        spacing=SPACING,
        seed=1,
    )


def test_sample_names() -> None:
    assert sample_names(3) == ["S0001", "S0002", "S0003"]
    assert sample_names(0) == []
    assert len(set(sample_names(12_000))) == 12_000


@needs_tools
def test_record_count_and_samples(vcf: Path) -> None:
    assert vcf.name == "cohort.vcf.gz"
    assert Path(f"{vcf}.csi").is_file()
    assert len(bcftools("view", "-H", vcf).splitlines()) == VARIANTS
    assert bcftools("query", "-l", vcf).split() == sample_names(SAMPLES)
    header = bcftools("view", "-h", vcf)
    assert "##fileformat=VCFv4.2" in header
    assert "##contig=<ID=chr1,length=248956422>" in header
    for tag in ("INFO=<ID=DP", "INFO=<ID=AF", "INFO=<ID=AC", "INFO=<ID=AN"):
        assert tag in header
    for tag in ("FORMAT=<ID=GT", "FORMAT=<ID=DP", "FORMAT=<ID=GQ"):
        assert tag in header


@needs_tools
def test_region_query_uses_index(vcf: Path) -> None:
    first, last = 10, 19  # variant i sits at START + i * SPACING
    region = f"chr1:{START + first * SPACING}-{START + last * SPACING}"
    rows = bcftools("view", "-H", "-r", region, vcf).splitlines()
    positions = [int(row.split("\t")[1]) for row in rows]
    assert positions == [START + i * SPACING for i in range(first, last + 1)]


@needs_tools
def test_info_counts_match_genotypes(vcf: Path) -> None:
    table = bcftools("query", "-f", "%REF %ALT %INFO/AC %INFO/AN %INFO/DP[ %GT][ %DP]\n", vcf)
    polymorphic = 0
    for line in table.splitlines():
        ref, alt, ac, an, dp, *rest = line.split()
        gts, depths = rest[:SAMPLES], rest[SAMPLES:]
        assert len(ref) == len(alt) == 1 and ref in "ACGT" and alt in "ACGT" and ref != alt
        alleles = [a for gt in gts for a in gt.split("/") if a != "."]
        assert int(an) == len(alleles)
        assert int(ac) == alleles.count("1")
        assert int(dp) == sum(int(d) for d in depths if d != ".")
        polymorphic += int(ac) > 0
    assert polymorphic > VARIANTS // 4


@needs_tools
def test_same_seed_same_records(tmp_path: Path) -> None:
    def make(name: str, seed: int) -> Path:
        return generate_vcf(tmp_path / name, samples=5, variants=300, seed=seed)

    a, b, c = make("a.vcf.gz", 7), make("b.vcf.gz", 7), make("c.vcf.gz", 8)
    assert records_md5(a) == records_md5(b)
    assert records_md5(a) != records_md5(c)


@needs_tools
def test_overwrites_existing_file(vcf: Path) -> None:
    again = generate_vcf(vcf, samples=2, variants=5, start=START, spacing=SPACING)
    assert len(bcftools("view", "-H", "-r", "chr1:1-2000", again).splitlines()) == 5
    assert not Path(f"{vcf}.tmp").exists()


def test_rejects_path_without_vcf_gz_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.vcf\.gz"):
        generate_vcf(tmp_path / "plain.vcf", samples=1, variants=1)


def test_missing_tool_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingToolError, match="bgzip"):
        generate_vcf(tmp_path / "x.vcf.gz", samples=1, variants=1)
