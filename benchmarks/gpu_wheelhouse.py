"""The GPU check for an air-gapped box: a wheelhouse of the few wheels the box lacks, and the sources it runs.

GPU clusters often come with a preinstalled CUDA stack and no network. This script runs on a connected machine, in a
checkout of this repository (it needs `build`, in the `test` extra), and writes one folder to copy to the box:

    python benchmarks/gpu_wheelhouse.py --out dist/gpu-wheelhouse

The box needs Python 3.12 (`--python`), torch (CUDA), transformers and accelerate, with their own dependencies; it may
have an older peft. The folder holds this package's wheel, the wheels in WHEELS (Python 3.12, manylinux x86-64,
downloaded with `pip download --no-deps`), and SOURCES_ARCHIVE: the benchmark scripts, the tests and
pyproject.toml (pytest's markers), without the package's sources, so that the check runs the installed wheel. At most
64 MiB in all. On the box, one command installs the wheels without an index beside the box's own packages (they come
first on PYTHONPATH, so the peft here shadows an older one) and runs the check, from the folder that holds
`gpu-wheelhouse/` (BOX_COMMAND; the script prints it):

    python3 -m pip install --no-index --no-deps --upgrade --target /tmp/comoe-site gpu-wheelhouse/*.whl && ...

(`--dry-run` at its end checks the install without a GPU: every step's modules import, nothing runs.)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
# What the box has: these and what they pull in (numpy, safetensors, huggingface_hub, tokenizers, packaging, pyyaml,
# psutil, tqdm, pygments through transformers' typer and rich, ...). peft may be there too, in an older version.
BOX = ("torch", "transformers", "accelerate")
# What the check needs beyond the box, pinned as in constraints.txt where it pins them (tests/test_gpu_wheelhouse.py).
WHEELS = {
    "peft": "0.21.2",  # the version CI tests; on PYTHONPATH it shadows the box's older peft, which stays installed
    "pytest": "9.2.0",  # the cuda_tests step (it also needs packaging >= 24 and pygments >= 2.15, both on the box)
    "pluggy": "1.7.0",  # pytest's
    "iniconfig": "2.3.1",  # pytest's
    "bitsandbytes": "0.50.2",  # tests/test_qlora.py's CUDA tests (4-bit and 8-bit bases); its CUDA kernels, 41 MiB
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
SOURCES_ARCHIVE = "gpu_check_sources.tar.gz"
LIMIT_BYTES = 64 * 2**20
# On the box, beside the copied folder `gpu-wheelhouse/`: install without an index, unpack the sources, run the check
# (results in /tmp/comoe-check/results). docs/benchmarks.md repeats it (tests/test_docs.py compares).
BOX_COMMAND = (
    "python3 -m pip install --no-index --no-deps --upgrade --target /tmp/comoe-site gpu-wheelhouse/*.whl"
    f" && mkdir -p /tmp/comoe-check && tar -xzf gpu-wheelhouse/{SOURCES_ARCHIVE} -C /tmp/comoe-check"
    " && cd /tmp/comoe-check && PYTHONPATH=/tmp/comoe-site python3 benchmarks/gpu_check.py --out-dir results"
)


def download_command(out: Path, python: str) -> list[str]:
    """`pip download` of WHEELS for CPython `python` on manylinux x86-64: wheels only, no dependencies."""
    platforms = [part for platform in PLATFORMS for part in ("--platform", platform)]
    abi = "cp" + python.replace(".", "")
    return [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", "--python-version", python,
            "--implementation", "cp", "--abi", abi, *platforms, "-d", str(out),
            *(f"{name}=={version}" for name, version in WHEELS.items())]


def source_files() -> list[str]:
    """The tracked files the check runs from: the benchmark scripts, the tests, pyproject.toml (no package sources)."""
    listed = subprocess.run(["git", "ls-files", "benchmarks/*.py", "tests", "pyproject.toml"], cwd=REPOSITORY,
                            capture_output=True, text=True, check=True).stdout.split()
    return sorted(name for name in listed if not name.startswith("comoe_peft"))


def write_sources(out: Path) -> Path:
    archive = out / SOURCES_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for name in source_files():
            tar.add(REPOSITORY / name, arcname=name)
    return archive


def build_wheel(out: Path) -> Path:
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", scratch, str(REPOSITORY)], check=True,
                       stdout=subprocess.DEVNULL)
        (wheel,) = Path(scratch).glob("comoe_peft-*.whl")
        return Path(shutil.copy2(wheel, out))


def check_size(out: Path) -> int:
    size = sum(path.stat().st_size for path in out.iterdir())
    if size > LIMIT_BYTES:
        raise SystemExit(f"gpu_wheelhouse: {out} holds {size / 2**20:.1f} MiB, over the 64 MiB limit")
    return size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="dist/gpu-wheelhouse", help="the folder to write (must be empty or new)")
    parser.add_argument("--python", default="3.12", help="the box's Python version, for the compiled wheels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"gpu_wheelhouse: {out} is not empty; remove it or name a new folder with --out "
                         "(two versions of one wheel would stop the install on the box)")
    if shutil.which("git") is None or not (REPOSITORY / ".git").exists():
        raise SystemExit("gpu_wheelhouse: run it in a git checkout of comoe_peft (the sources are its tracked files)")
    try:
        import build  # noqa: F401
    except ImportError:
        raise SystemExit("gpu_wheelhouse: needs `build` (pip install build, or the `test` extra)") from None
    out.mkdir(parents=True, exist_ok=True)
    wheel = build_wheel(out)
    subprocess.run(download_command(out, args.python), check=True)
    write_sources(out)
    size = check_size(out)
    for path in sorted(out.iterdir()):
        print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path.name}")
    print(f"{size / 2**20:8.2f} MiB  in {out} (limit 64 MiB); this package: {wheel.name}")
    print(f"Copy it to the box as gpu-wheelhouse/ and run there, beside it:\n{BOX_COMMAND}")
    return out


if __name__ == "__main__":
    main()
