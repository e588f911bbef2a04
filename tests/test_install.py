"""The install files (requirements.txt, pyproject.toml) against each other, against torch's own pins and against
the code: what a fresh machine installs from them must resolve and must hold every package the code imports.

These read files and this environment's installed metadata only; tests/test_dispatch.py checks the other half
of installing anywhere, the paths that turn off with a Triton they were not tested on.
"""
import ast
import fnmatch
import importlib.metadata
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "longctx"
SKIP = {"outputs", "multirun", "build", "dist", "node_modules", "__pycache__"}   # besides hidden folders (.venv)

# torch's Linux wheels pin the Triton they were built with: each version's wheel METADATA has
# `Requires-Dist: triton==X; platform_system == "Linux"` (read off PyPI's manylinux_2_28 x86_64 and aarch64 wheels;
# its CPU wheel names none). requirements.txt must pin that Triton beside torch, or pip cannot resolve the file on
# a Linux machine that takes torch from PyPI.
TRITON_FOR_TORCH = {"2.11.0": "3.6.0", "2.12.0": "3.7.0", "2.13.0": "3.7.1"}
# The GPU image's torch and Triton (device KINDS.md), which a library install must keep.
GPU_IMAGE = {"torch": "2.11.0", "triton": "3.6.0"}
# transformers from 5.25.0 on requires Hugging Face's `kernels` distribution (its METADATA: `kernels<0.20,>=0.19.1`),
# whose top-level package `kernels` is installed over ours.
FIRST_TRANSFORMERS_WITH_KERNELS = (5, 25)
# Installed for the tests only: pyproject's `test` extra, besides requirements.txt.
TEST_ONLY = {"pytest"}


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): PyYAML, pyyaml and py_yaml are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(line: str) -> tuple[str, str]:
    """'numpy>=2,<2.4 ; python_version > "3"' -> ('numpy', '>=2,<2.4'): the name and the version specifier."""
    requirement = line.split(";")[0].strip()
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group()
    return canonical(name), requirement[len(name):].replace(" ", "")


def requirements() -> dict[str, str]:
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return dict(parse(line) for line in lines if line)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dependencies(extras: tuple[str, ...] = ()) -> dict[str, str]:
    project = pyproject()["project"]
    listed = project["dependencies"] + [d for extra in extras for d in project["optional-dependencies"][extra]]
    return dict(parse(line) for line in listed)


def release(version: str) -> tuple[int, ...]:
    """'3.7.1' -> (3, 7, 1); '2.13.0+cpu' -> (2, 13, 0)."""
    return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", version).group().split("."))


def admits(specifier: str, version: str) -> bool:
    """Whether a version specifier of the forms the install files use (==, !=, >=, <=, >, <, joined by commas;
    '' admits everything) admits this release."""
    ops = {"==": tuple.__eq__, "!=": tuple.__ne__, ">=": tuple.__ge__, "<=": tuple.__le__,
           ">": tuple.__gt__, "<": tuple.__lt__}
    have = release(version)
    for clause in filter(None, specifier.split(",")):
        op, bound = re.match(r"(==|!=|>=|<=|>|<)(.+)", clause).groups()
        want = release(bound)
        width = max(len(have), len(want))
        if not ops[op](have + (0,) * (width - len(have)), want + (0,) * (width - len(want))):
            return False
    return True


def pinned(specifier: str) -> str:
    assert specifier.startswith("==") and "," not in specifier, f"expected an exact pin, got {specifier!r}"
    return specifier[2:]


def walk(pattern: str) -> list[Path]:
    """The repository's own files named like pattern: not the venv's, a build's or Hydra's run directories'."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in SKIP]
        found += [Path(folder, f) for f in files if fnmatch.fnmatch(f, pattern)]
    return sorted(found)


def packages() -> set[str]:
    """Every package directory (one with an __init__.py), dotted: kernels, model, ..."""
    return {".".join(p.parent.relative_to(ROOT).parts) for p in walk("__init__.py")}


def first_party() -> set[str]:
    """Names our own code imports of itself: the root's packages, folders and modules, and the modules beside a
    script or test (Python puts the running file's folder on the path)."""
    names = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in walk("*.py")}
    return names | {p.stem for folder in ("scripts", "tests") for p in (ROOT / folder).glob("*.py")}


def imported(path: Path) -> set[str]:
    """Top-level names of the absolute imports anywhere in a file (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def third_party_imports() -> dict[str, set[Path]]:
    """{top-level module: files importing it} for every import that is neither the standard library nor ours."""
    ours = first_party() | set(sys.stdlib_module_names) | {"__future__"}
    found: dict[str, set[Path]] = {}
    for path in walk("*.py"):
        for name in imported(path) - ours:
            found.setdefault(name, set()).add(path.relative_to(ROOT))
    return found


def test_triton_pin_is_the_one_the_torch_pin_requires():
    pins = requirements()
    torch_version, triton_version = pinned(pins["torch"]), pinned(pins["triton"])
    assert torch_version in TRITON_FOR_TORCH, (
        f"torch {torch_version}: add the Triton its Linux wheel requires (METADATA Requires-Dist) to TRITON_FOR_TORCH")
    assert triton_version == TRITON_FOR_TORCH[torch_version], (
        f"requirements.txt pins triton {triton_version}, but torch {torch_version}'s Linux wheels require "
        f"triton=={TRITON_FOR_TORCH[torch_version]}: pip cannot resolve both")
    # where the installed torch is the pinned one and names its Triton (a CUDA build), the table agrees with it
    installed = importlib.metadata.version("torch")
    named = [parse(r)[1] for r in importlib.metadata.requires("torch") or [] if parse(r)[0] == "triton"]
    if release(installed) == release(torch_version) and named:
        assert named[0] == f"=={TRITON_FOR_TORCH[torch_version]}", named


def test_pyproject_admits_the_pins_and_the_gpu_image():
    # a library install keeps the user's torch and Triton: pyproject's ranges must admit requirements.txt's pins
    # (so the two files install one set) and the GPU image's older pair
    pins, declared = requirements(), dependencies(("test",))
    for name, specifier in pins.items():
        if specifier.startswith("=="):
            assert admits(declared.get(name, ""), pinned(specifier)), (
                f"pyproject.toml's {name}{declared.get(name)} does not admit requirements.txt's {name}{specifier}")
    for name, version in GPU_IMAGE.items():
        assert admits(declared[name], version), f"pyproject.toml's {name}{declared[name]} excludes the GPU image's {version}"


def test_transformers_pin_does_not_bring_a_second_kernels_package():
    for where, specs in (("requirements.txt", requirements()), ("pyproject.toml", dependencies())):
        version = release(pinned(specs["transformers"]))
        assert version[:2] < FIRST_TRANSFORMERS_WITH_KERNELS, (
            f"{where}: transformers {'.'.join(map(str, version))} requires Hugging Face's `kernels`, which is "
            "installed over our kernels/ package")


def test_no_installed_distribution_provides_a_first_party_package():
    # `import kernels` (or model, data, training) must find ours: another distribution's top-level package of that
    # name (Hugging Face's kernels, brought by transformers >= 5.25) would be installed over it
    providers = importlib.metadata.packages_distributions()
    clashes = {name: providers[name] for name in packages()
               if name in providers and set(map(canonical, providers[name])) != {PROJECT}}
    assert not clashes, f"installed distributions provide packages named like ours: {clashes}"


def test_every_imported_distribution_is_declared():
    # each third-party import, as the distribution that installs it (yaml -> PyYAML, hydra -> hydra-core), must be
    # in requirements.txt (make venv) and in pyproject.toml (pip install -e .), the tests' in its test extra
    providers = importlib.metadata.packages_distributions()
    pins, runtime, with_tests = requirements(), dependencies(), dependencies(("test",))
    missing = []
    for module, files in sorted(third_party_imports().items()):
        if module not in providers:
            missing.append(f"{module} (imported by {sorted(map(str, files))}) is installed by no distribution here")
            continue
        dists = {canonical(d) for d in providers[module]}
        declared = with_tests if all(f.parts[0] == "tests" for f in files) else runtime
        for where, names in (("requirements.txt", pins), ("pyproject.toml", declared)):
            if not dists & names.keys():
                missing.append(f"{module} ({'/'.join(sorted(dists))}, imported by {sorted(map(str, files))[:3]}) "
                               f"is not in {where}")
    assert not missing, "\n".join(missing)
    assert TEST_ONLY <= with_tests.keys() and not TEST_ONLY & runtime.keys()


def test_pyproject_packages_cover_every_package_directory():
    # `pip install .` installs only the packages listed: a package directory left out (training/ was) imports from
    # the checkout but not from an install
    listed, on_disk = set(pyproject()["tool"]["setuptools"]["packages"]), packages()
    assert on_disk == listed, (f"missing from pyproject.toml: {sorted(on_disk - listed)}; "
                               f"listed but not packages: {sorted(listed - on_disk)}")


@pytest.mark.parametrize("specifier, version, expected", [
    ("", "1.0", True), ("==3.7.1", "3.7.1", True), ("==3.7.1", "3.7.0", False), (">=2.11", "2.13.0+cpu", True),
    (">=2.11", "2.4.1", False), ("<2.4", "2.3.5", True), ("<2.4", "2.4.0", False), (">=3.0,<3.8", "3.8.0", False),
])
def test_admits(specifier, version, expected):
    # the specifier check the tests above rely on, on the forms the install files use
    assert admits(specifier, version) is expected
