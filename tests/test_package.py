"""Packaging and boundaries: one `shardlm` namespace, mesh axis names only in sharding/."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_only_the_shardlm_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                    "--target", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    top = {p.name for p in tmp_path.iterdir() if not p.name.endswith(".dist-info")} - {"bin"}
    assert top == {"shardlm"}, top
    assert {p.name for p in (tmp_path / "shardlm").iterdir()} >= {"models", "sharding", "engine", "checkpoints"}
    entry = next(tmp_path.glob("shardlm-*.dist-info")) / "entry_points.txt"
    assert "shardlm = shardlm.engine.cli:main" in entry.read_text()


def test_mesh_axes_are_named_only_in_sharding():
    """Models, engine and checkpoints speak logical axis names; mesh axes live in sharding/."""
    mesh_axis = re.compile(r"""["'](stage|x|y|z)["']""")
    mesh_api = re.compile(r"PartitionSpec|NamedSharding\(|with_sharding_constraint|\bMesh\(")
    offenders = []
    for pkg in ("models", "engine", "checkpoints"):
        for path in (ROOT / pkg).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if mesh_axis.search(code) or mesh_api.search(code):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_architecture_doc_matches_the_modules():
    """docs/architecture.md names every module of each package, and names no module that is not there."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for package in ("sharding", "models", "checkpoints", "engine"):
        section = re.search(rf"^## {package}/.*?(?=^## |\Z)", doc, re.S | re.M).group(0)
        named = set(re.findall(r"^- `(\w+\.py)`", section, re.M))
        present = {p.name for p in (ROOT / package).glob("*.py")} - {"__init__.py"}
        assert named == present, (package, named, present)
