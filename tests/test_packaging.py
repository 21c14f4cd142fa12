"""The wheel must carry every package: with two source roots the package list is explicit."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_packages() -> set[str]:
    found = set()
    roots = ((ROOT / "services", ""), (ROOT / "media-node", ""), (ROOT / "web", "spaces.web"))
    for root, prefix in roots:
        for init in root.rglob("__init__.py"):
            parts = init.parent.relative_to(root).parts
            if "__pycache__" not in parts:
                found.add(".".join(p for p in (prefix, *parts) if p))
    return found


def test_pyproject_lists_every_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert listed == source_packages()


def test_the_built_wheel_contains_every_module(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("spaces-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in source_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    for module in (
        "spaces/cli.py",
        "spaces/media/aiortc_adapter.py",
        "spaces/sdk/client.py",
        "spaces/v1/media_pb2.py",
        "spaces/sdk/py.typed",
        "spaces/web/spaces.js",
        "spaces/web/spaces.d.ts",
        "spaces/web/index.html",
    ):
        assert module in names, module


def test_ci_runs_the_readmes_test_commands_and_nothing_cleverer() -> None:
    script = ROOT / ".ci" / "run"
    assert script.stat().st_mode & 0o111, ".ci/run must be executable"
    commands = [
        line.strip()
        for line in script.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert commands == ["make test", "make test-bench"]
    readme = (ROOT / "README.md").read_text()
    for command in commands:
        assert f"`{command}`" in readme, f"the README does not name {command}"
