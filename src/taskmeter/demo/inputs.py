"""The demo's input VCFs: generated ones (a grid of sizes) and the user's own.

A user's file is checked before anything starts (:func:`check_vcf`, pure Python), then
prepared in the workdir (:func:`prepare_user_vcf`): a plain ``.vcf`` or a gzip file
that is not BGZF is bgzipped there; a ``.vcf.gz`` without an index is indexed there
(the user's directory is never written to).
"""

from __future__ import annotations

import gzip
import os
import subprocess
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from taskmeter.demo.vcfgen import generate_vcf, sample_names

# (samples, variants): a grid from small to ~35 MB compressed; the whole demo stays
# under ~2 minutes on 2 cores.
DEFAULT_GRID: tuple[tuple[int, int], ...] = ((50, 5_000), (200, 20_000), (500, 50_000))
GEN_START, GEN_SPACING = 10_000, 100  # vcfgen's defaults: variant i at start + i * spacing


class InputError(ValueError):
    """A user-given file the demo cannot use (the message names it and says why)."""


@dataclass(frozen=True)
class InputVCF:
    label: str  # for tables: "200 samples × 20000 variants" or the file name
    path: Path  # bgzipped, indexed
    index: Path  # .csi or .tbi next to it
    samples: list[str]
    region: str  # the region tasks subset (about half of the first contig's records)
    variants: int | None = None  # known for generated files
    merge_region: str = ""  # vcf.merge's region (merging is the heaviest step) [region]

    @property
    def key(self) -> str:
        return f"inputs/{self.path.name}"

    @property
    def index_key(self) -> str:
        return f"inputs/{self.index.name}"


# -- checks (before anything starts) ------------------------------------------------------
def _is_bgzf(head: bytes) -> bool:
    # BGZF: a gzip member with FEXTRA and the 'BC' subfield (SAM/BAM spec, section 4.1).
    return len(head) >= 18 and head[:4] == b"\x1f\x8b\x08\x04" and head[12:14] == b"BC"


def check_vcf(path: Path) -> str:
    """``"bgzf"``, ``"gzip"`` or ``"plain"``; :class:`InputError` if not a VCF."""
    try:
        with open(path, "rb") as f:
            head = f.read(18)
        compression = "plain"
        if head[:2] == b"\x1f\x8b":
            compression = "bgzf" if _is_bgzf(head) else "gzip"
            with gzip.open(path, "rb") as g:
                first = g.readline(200)
        else:
            with open(path, "rb") as f:
                first = f.readline(200)
    except IsADirectoryError:
        raise InputError(f"{path} is not a VCF (it is a directory)") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path} is not a VCF (cannot read it: {exc})") from None
    if not first.startswith(b"##fileformat=VCF"):
        shown = first[:40].decode("utf-8", "replace").strip() or "empty"
        raise InputError(
            f"{path} is not a VCF (its first line should start with '##fileformat=VCF', "
            f"found {shown!r})"
        )
    return compression


# -- preparation --------------------------------------------------------------------------
def _run(
    argv: list[str],
    what: str,
    *,
    stdin: IO[bytes] | int | None = None,
    stdout: IO[bytes] | int = subprocess.PIPE,
) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise InputError(f"{what} failed (exit {proc.returncode}): {err[-800:]}")
    return proc


def _existing_index(path: Path) -> Path | None:
    for suffix in (".csi", ".tbi"):
        idx = Path(f"{path}{suffix}")
        if idx.exists() and idx.stat().st_mtime >= path.stat().st_mtime - 1:
            return idx
    return None


def prepare_user_vcf(path: Path, dest: Path) -> tuple[Path, Path, str]:
    """A bgzipped, indexed VCF for ``path`` (itself when it already is one), its index,
    and what was done. New files go to ``dest``."""
    compression = check_vcf(path)
    dest.mkdir(parents=True, exist_ok=True)
    if compression == "bgzf":
        idx = _existing_index(path)
        if idx is not None:
            return path, idx, "bgzipped and indexed: used as is"
        # Index into the workdir, next to a link to the file (bcftools looks there).
        name = path.name if path.name.endswith((".gz", ".bgz")) else path.name + ".gz"
        link = dest / name
        link.unlink(missing_ok=True)
        try:
            link.symlink_to(path.resolve())
        except OSError:
            import shutil

            shutil.copyfile(path, link)
        _run(["bcftools", "index", "-f", "--csi", str(link)], f"bcftools index {path}")
        return link, Path(f"{link}.csi"), "not indexed: indexed with bcftools index"
    base = path.name
    for suffix in (".gz", ".bgz"):
        base = base.removesuffix(suffix)
    out = dest / (base.removesuffix(".vcf") + ".vcf.gz")
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as sink:
        if compression == "gzip":
            with subprocess.Popen(["gzip", "-dc", str(path)], stdout=subprocess.PIPE) as gz:
                _run(["bgzip", "-c"], f"bgzip {path}", stdin=gz.stdout, stdout=sink)
        else:
            _run(["bgzip", "-c", str(path)], f"bgzip {path}", stdout=sink)
    os.replace(tmp, out)
    _run(["bcftools", "index", "-f", "--csi", str(out)], f"bcftools index {out}")
    done = "gzip, not bgzip" if compression == "gzip" else "not compressed"
    return out, Path(f"{out}.csi"), f"{done}: bgzipped into the workdir and indexed"


def describe_user_vcf(original: Path, path: Path, index: Path) -> InputVCF:
    """Samples (``bcftools query -l``) and a region: the first contig with records."""
    samples = _run(["bcftools", "query", "-l", str(path)], f"bcftools query -l {original}")
    names = samples.stdout.decode().split()
    stats = _run(["bcftools", "index", "-s", str(path)], f"bcftools index -s {original}")
    rows = [line.split("\t") for line in stats.stdout.decode().splitlines() if line.strip()]
    if not rows:
        raise InputError(f"{original} has no variant records to work on")
    contig, length = rows[0][0], rows[0][1]
    region = contig if not length.isdigit() else f"{contig}:1-{max(1, int(length) // 2)}"
    return InputVCF(original.name, path, index, names, region)


# -- generated inputs ---------------------------------------------------------------------
def generated_name(samples: int, variants: int) -> str:
    return f"cohort_{samples}x{variants}.vcf.gz"


def _generate(path: Path, samples: int, variants: int) -> Path:
    return generate_vcf(path, samples=samples, variants=variants, seed=samples)


def generate_grid(dest: Path, grid: tuple[tuple[int, int], ...], workers: int = 2
                  ) -> list[InputVCF]:  # fmt: skip
    """Generate the grid's VCFs in parallel (kept and reused when ``dest`` persists)."""
    dest.mkdir(parents=True, exist_ok=True)
    todo = []
    for samples, variants in grid:
        path = dest / generated_name(samples, variants)
        if not (path.exists() and Path(f"{path}.csi").exists()):
            todo.append((path, samples, variants))
    if len(todo) == 1:
        _generate(*todo[0])
    elif todo:
        # Largest first, so the small ones fill the other core meanwhile.
        todo.sort(key=lambda t: t[1] * t[2], reverse=True)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(_generate, *t) for t in todo]:
                future.result()
    out = []
    for samples, variants in grid:
        path = dest / generated_name(samples, variants)
        half_end = GEN_START + (variants // 2) * GEN_SPACING
        quarter_end = GEN_START + (variants // 4) * GEN_SPACING
        out.append(InputVCF(
            f"{samples} samples × {variants // 1000}k variants", path, Path(f"{path}.csi"),
            sample_names(samples), f"chr1:1-{half_end}", variants, f"chr1:1-{quarter_end}",
        ))  # fmt: skip
    return out
