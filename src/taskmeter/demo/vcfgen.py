"""Deterministic generator of realistic VCF 4.2 files (bgzip-compressed, CSI-indexed).

The output is meant for the demo, the tests and the benchmarks: real ``bcftools`` runs on
it the way it would on a small cohort's call set.

* One chromosome, ``variants`` biallelic SNVs at ``start + i * spacing`` (i = 0, 1, ...),
  so a region's record count is known in advance. REF/ALT are random bases with a
  transition/transversion ratio near 2.
* Per site an allele frequency is drawn from a spectrum skewed to rare variants, a
  missing-call rate of 0-4 %, and each sample's genotype from Hardy-Weinberg proportions.
* FORMAT ``GT:DP:GQ`` (missing calls are ``./.:.:.``); INFO ``DP`` (sum of sample depths),
  ``AC``/``AN`` counted from the genotypes and ``AF = AC/AN``, as ``bcftools +fill-tags``
  would compute them. QUAL below 50 is filtered ``LowQual``, the rest ``PASS``.
* Same arguments and seed give byte-identical records (``random.Random(seed)`` only).

The text is piped to ``bgzip -c`` in ~1 MB chunks, so generation (this process) and
compression (bgzip) run on two cores, and is indexed with ``bcftools index`` (a CSI index,
``<path>.csi``; CSI rather than tabix's TBI because it has no 512 Mbp contig limit).

Run ``python -m taskmeter.demo.vcfgen OUT.vcf.gz --samples N --variants M`` to make one.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["MissingToolError", "generate_vcf", "sample_names"]

# GRCh38 primary assembly lengths: realistic ##contig headers for the usual names.
GRCH38_LENGTHS: dict[str, int] = {
    "chr1": 248_956_422, "chr2": 242_193_529, "chr3": 198_295_559, "chr4": 190_214_555,
    "chr5": 181_538_259, "chr6": 170_805_979, "chr7": 159_345_973, "chr8": 145_138_636,
    "chr9": 138_394_717, "chr10": 133_797_422, "chr11": 135_086_622, "chr12": 133_275_309,
    "chr13": 114_364_328, "chr14": 107_043_718, "chr15": 101_991_189, "chr16": 90_338_345,
    "chr17": 83_257_441, "chr18": 80_373_285, "chr19": 58_617_616, "chr20": 64_444_167,
    "chr21": 46_709_983, "chr22": 50_818_468, "chrX": 156_040_895, "chrY": 57_227_415,
}  # fmt: skip

_TRANSITION = {"A": "G", "G": "A", "C": "T", "T": "C"}
_TRANSVERSIONS = {"A": "CT", "G": "CT", "C": "AG", "T": "AG"}
_POOL_PER_GENOTYPE = 16  # distinct "GT:DP:GQ" strings per genotype class
_POOL_REFRESH_SITES = 1_000  # sites between redraws of the pool (depths drift)
_CHUNK_BYTES = 1 << 18
_PIPE_BYTES = 1 << 20  # room for 4 chunks, so bgzip compresses while we generate
_MIN_QUAL_PASS = 50.0


class MissingToolError(RuntimeError):
    """A command-line tool the generator needs is not on PATH."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(
            f"'{tool}' not found on PATH: install the Debian package '{package}' "
            "(scripts/setup.sh does)"
        )
        self.tool = tool


def sample_names(samples: int) -> list[str]:
    """Sample names ``S0001``, ``S0002``, ... (more digits past 9999)."""
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    return [f"S{i:04d}" for i in range(1, samples + 1)]


def _require(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise MissingToolError(tool, package)
    return found


def _grow_pipe(fd: int) -> None:
    """Enlarge a pipe (Linux). With the default 64 KiB the writer and bgzip take turns."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, set_size, _PIPE_BYTES)


def _header(chrom: str, length: int, names: list[str], seed: int) -> str:
    lines = [
        "##fileformat=VCFv4.2",
        f"##source=taskmeter.demo.vcfgen (seed={seed})",
        f"##contig=<ID={chrom},length={length}>",
        '##FILTER=<ID=PASS,Description="All filters passed">',
        f'##FILTER=<ID=LowQual,Description="QUAL below {_MIN_QUAL_PASS:g}">',
        '##INFO=<ID=DP,Number=1,Type=Integer,Description="Combined depth across samples">',
        '##INFO=<ID=AF,Number=A,Type=Float,Description="Allele frequency, AC/AN">',
        '##INFO=<ID=AC,Number=A,Type=Integer,Description="Allele count in genotypes">',
        '##INFO=<ID=AN,Number=1,Type=Integer,Description="Total number of alleles in '
        'called genotypes">',
        '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
        '##FORMAT=<ID=DP,Number=1,Type=Integer,Description="Read depth">',
        '##FORMAT=<ID=GQ,Number=1,Type=Integer,Description="Genotype quality">',
        "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT"])
        + "".join("\t" + name for name in names),
    ]
    return "\n".join(lines) + "\n"


def _draw_pool(rng: random.Random) -> tuple[list[str], list[int]]:
    """FORMAT strings for genotype classes 0/0, 0/1, 1/1, ./. (in that order) and depths."""
    mean_depth = rng.uniform(15.0, 45.0)
    strings: list[str] = []
    depths: list[int] = []
    for gt, gq_per_read in (("0/0", 3.0), ("0/1", 2.0), ("1/1", 3.0)):
        for _ in range(_POOL_PER_GENOTYPE):
            dp = max(1, round(rng.gauss(mean_depth, mean_depth * 0.35)))
            gq = min(99, int(dp * gq_per_read * rng.uniform(0.5, 1.2)))
            strings.append(f"{gt}:{dp}:{gq}")
            depths.append(dp)
    strings.extend(["./.:.:."] * _POOL_PER_GENOTYPE)
    depths.extend([0] * _POOL_PER_GENOTYPE)
    return strings, depths


def _records(
    rng: random.Random, *, samples: int, variants: int, chrom: str, start: int, spacing: int
) -> Iterator[str]:
    """Yield record lines (with newline), in position order."""
    population = range(4 * _POOL_PER_GENOTYPE)
    strings: list[str] = []
    depths: list[int] = []
    for i in range(variants):
        if i % _POOL_REFRESH_SITES == 0:
            strings, depths = _draw_pool(rng)
        af = min(0.95, max(0.0005, rng.betavariate(0.4, 2.0)))
        missing = rng.random() * 0.04
        called = 1.0 - missing
        class_weights = (
            (1.0 - af) ** 2 * called,
            2.0 * af * (1.0 - af) * called,
            af * af * called,
            missing,
        )
        cum_weights = list(
            itertools.accumulate(
                itertools.chain.from_iterable(
                    itertools.repeat(w / _POOL_PER_GENOTYPE, _POOL_PER_GENOTYPE)
                    for w in class_weights
                )
            )
        )
        picks = rng.choices(population, cum_weights=cum_weights, k=samples)
        fmt = "\t".join(map(strings.__getitem__, picks))
        depth = sum(map(depths.__getitem__, picks))
        ac = fmt.count("0/1") + 2 * fmt.count("1/1")
        an = 2 * (samples - fmt.count("./."))
        af_text = f"{ac / an:.4g}" if an else "."

        ref = rng.choice("ACGT")
        alt = _TRANSITION[ref] if rng.random() < 0.67 else rng.choice(_TRANSVERSIONS[ref])
        qual = 10.0 + rng.expovariate(1.0 / 400.0) if ac else rng.uniform(0.0, 30.0)
        filt = "PASS" if qual >= _MIN_QUAL_PASS else "LowQual"
        yield (
            f"{chrom}\t{start + i * spacing}\t.\t{ref}\t{alt}\t{qual:.1f}\t{filt}\t"
            f"DP={depth};AF={af_text};AC={ac};AN={an}\tGT:DP:GQ\t{fmt}\n"
        )


def generate_vcf(
    path: str | os.PathLike[str],
    *,
    samples: int,
    variants: int,
    chrom: str = "chr1",
    seed: int = 0,
    start: int = 10_000,
    spacing: int = 100,
) -> Path:
    """Write a bgzip-compressed VCF 4.2 at ``path`` (``.vcf.gz``) and its ``.csi`` index.

    Variant ``i`` is at ``start + i * spacing``. Needs ``bgzip`` (Debian ``tabix``) and
    ``bcftools`` on PATH (:class:`MissingToolError` otherwise). Returns ``path``.
    """
    out = Path(path)
    if not out.name.endswith(".vcf.gz") or out.name == ".vcf.gz":
        raise ValueError(f"VCF path must end with .vcf.gz (bgzip-compressed): {out}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if variants < 0:
        raise ValueError(f"variants must be >= 0, got {variants}")
    if start < 1 or spacing < 1:
        raise ValueError(f"start and spacing must be >= 1, got {start} and {spacing}")
    if not chrom or any(c.isspace() or c in ":,<>" for c in chrom):
        raise ValueError(f"invalid chromosome name: {chrom!r}")
    bgzip = _require("bgzip", "tabix")
    bcftools = _require("bcftools", "bcftools")

    last_pos = start + max(variants - 1, 0) * spacing
    length = max(GRCH38_LENGTHS.get(chrom, 0), last_pos + spacing)
    rng = random.Random(seed)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as sink:
        proc = subprocess.Popen([bgzip, "-c"], stdin=subprocess.PIPE, stdout=sink)
        assert proc.stdin is not None
        _grow_pipe(proc.stdin.fileno())
        try:
            with proc.stdin as pipe:
                pipe.write(_header(chrom, length, sample_names(samples), seed).encode())
                chunk: list[str] = []
                size = 0
                records = _records(
                    rng,
                    samples=samples,
                    variants=variants,
                    chrom=chrom,
                    start=start,
                    spacing=spacing,
                )
                for line in records:
                    chunk.append(line)
                    size += len(line)
                    if size >= _CHUNK_BYTES:
                        pipe.write("".join(chunk).encode())
                        chunk.clear()
                        size = 0
                pipe.write("".join(chunk).encode())
        except BaseException:
            proc.kill()
            proc.wait()
            tmp.unlink(missing_ok=True)
            raise
        if proc.wait() != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"bgzip exited with status {proc.returncode} writing {out}")
    os.replace(tmp, out)
    Path(f"{out}.tbi").unlink(missing_ok=True)  # a stale TBI would shadow the new CSI
    subprocess.run([bcftools, "index", "--force", "--csi", str(out)], check=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m taskmeter.demo.vcfgen``: write one VCF and print size and speed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("path", type=Path)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--variants", type=int, default=10_000)
    parser.add_argument("--chrom", default="chr1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    out = generate_vcf(
        args.path,
        samples=args.samples,
        variants=args.variants,
        chrom=args.chrom,
        seed=args.seed,
    )
    seconds = time.perf_counter() - began
    size = out.stat().st_size
    print(
        f"{out}: {args.variants} variants x {args.samples} samples, "
        f"{size / 1e6:.1f} MB compressed, {seconds:.2f} s"
    )


if __name__ == "__main__":
    main()
