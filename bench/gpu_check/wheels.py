"""`make gpu-wheels` (`python -m bench.gpu_check.wheels`): the Python packages Loom needs that the GPU machine's
image lacks or has too old, as CPython 3.12 manylinux x86_64 wheels in .whl/ (git-ignored), which the GPU kit
installs first with no index and no dependency resolution (that machine has no network).

Which ones: starting from pyproject.toml's runtime requirements, a requirement the image's package does not
satisfy (device_image.txt: absent, a version outside the bounds, or an unknown version where the requirement
has bounds) is met by carrying that package at its requirements.lock version, and the carried wheel's own
Requires-Dist join the requirements, until nothing more is needed. torch stays the image's CUDA build, and so
does what the lock leaves out (setuptools). Only what the image cannot serve travels: a package it has at a
good version is never shadowed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[2]
WHEEL_DIR = REPO / ".whl"
IMAGE_FILE = Path(__file__).with_name("device_image.txt")
MAX_BYTES = 60 << 20
# The image's own CUDA build: never carried, whatever a requirement says of its version (the kit reports it).
KEPT = frozenset({"torch"})
# Where the wheels run: python3 of the GPU image.
PYTHON_VERSION = "3.12"
TARGET = {"python_version": PYTHON_VERSION, "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
# Oldest first, so that pip prefers the most widely compatible build of a package.
PLATFORMS = ["manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in range(17, 40)]


class PlanError(RuntimeError):
    pass


def read_lock(path: Path = REPO / "requirements.lock") -> dict[str, str]:
    """Canonical name -> locked version."""
    pins = [Requirement(line) for line in path.read_text().splitlines() if line.strip() and line[0] != "#"]
    return {canonicalize_name(r.name): next(iter(r.specifier)).version for r in pins}


def read_image(path: Path = IMAGE_FILE) -> dict[str, str | None]:
    """Canonical name -> the image's version (None: there, version unknown)."""
    image = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            image[canonicalize_name(name)] = version or None
    return image


def runtime_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    return [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]


def applies(requirement: Requirement) -> bool:
    """Whether the requirement holds on the GPU machine (its markers evaluated there, no extras)."""
    return requirement.marker is None or requirement.marker.evaluate(TARGET)


def image_serves(requirement: Requirement, image: dict[str, str | None]) -> bool:
    name = canonicalize_name(requirement.name)
    if name not in image:
        return False
    version = image[name]
    if version is None:
        return not requirement.specifier  # bounds on an unknown version cannot be vouched for
    return requirement.specifier.contains(version, prereleases=True)


def plan(lock: dict[str, str], image: dict[str, str | None], requirements: list[Requirement],
         requires_of: Callable[[dict[str, str]], list[Requirement]]) -> dict[str, str]:
    """The packages to carry (canonical name -> version). `requires_of(packages)`: the Requires-Dist of those
    packages at those versions (read from their wheels). Raises PlanError when a needed package is not in the
    lock or its locked version breaks a requirement."""
    carried: dict[str, str] = {}
    pending = list(requirements)
    while True:
        new: dict[str, str] = {}
        for requirement in filter(applies, pending):
            name = canonicalize_name(requirement.name)
            if name in KEPT or (name not in carried and name not in new and image_serves(requirement, image)):
                continue
            if name not in lock and name in image:  # pip's tooling (setuptools), which the lock leaves out
                continue
            if name not in lock:
                raise PlanError(f"{requirement} is needed on the GPU machine but {name} is not in requirements.lock")
            if not requirement.specifier.contains(lock[name], prereleases=True):
                raise PlanError(f"{requirement} is needed, requirements.lock has {name}=={lock[name]}")
            if name not in carried:
                new[name] = lock[name]
        if not new:
            return carried
        carried |= new
        pending += requires_of(new)


def wheel_requires(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(z.read(metadata).decode())
    return [Requirement(r) for r in message.get_all("Requires-Dist") or []]


def wheels_in(directory: Path) -> dict[str, Path]:
    """Canonical name -> its wheel in `directory`."""
    return {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in sorted(directory.glob("*.whl"))}


def download(packages: dict[str, str], dest: Path) -> None:
    """The wheels of `packages` for the GPU machine into `dest`, each once (already there: kept)."""
    have = wheels_in(dest)
    missing = [f"{n}=={v}" for n, v in packages.items()
               if n not in have or str(parse_wheel_filename(have[n].name)[1]) != v]
    if not missing:
        return
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", PYTHON_VERSION, "--implementation", "cp", *platforms, "--dest", str(dest),
                    *missing], check=True)


def fetch(dest: Path = WHEEL_DIR) -> dict[str, Path]:
    """Plans, downloads and prunes `dest` to exactly the planned wheels; returns them."""
    dest.mkdir(exist_ok=True)

    def requires_of(packages: dict[str, str]) -> list[Requirement]:
        download(packages, dest)
        have = wheels_in(dest)
        return [r for name in packages for r in wheel_requires(have[name])]

    carried = plan(read_lock(), read_image(), runtime_requirements(), requires_of)
    for name, wheel in wheels_in(dest).items():
        if carried.get(name) != str(parse_wheel_filename(wheel.name)[1]):
            wheel.unlink()  # another package or version: two of one package would stop the install
    return wheels_in(dest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check.wheels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", type=Path, default=WHEEL_DIR)
    args = p.parse_args(argv)
    wheels = fetch(args.dest)
    total = sum(w.stat().st_size for w in wheels.values())
    for name, wheel in wheels.items():
        print(f"{wheel.stat().st_size / 1e6:8.1f} MB  {wheel.name}")
    print(f"{total / 1e6:8.1f} MB  {len(wheels)} wheels in {args.dest}")
    if total > MAX_BYTES:
        print(f"more than {MAX_BYTES >> 20} MB: too much to carry to the GPU machine", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
