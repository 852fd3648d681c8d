"""What `pip install` puts into site-packages (pyproject.toml): our packages under names of ours (no top-level `cli`
to collide with another project's), every folder of the library with its data files, and a `lora-rlhf` script
that imports."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import typer

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = CONFIG["tool"]["setuptools"]


def test_the_cli_installs_under_our_name_and_the_script_points_into_it():
    module_name, _, attribute = CONFIG["project"]["scripts"]["lora-rlhf"].partition(":")
    package = module_name.split(".")[0]
    assert package == "lora_rlhf_cli" and SETUPTOOLS["package-dir"] == {package: "cli"}
    assert package in SETUPTOOLS["packages"] and not any(p.split(".")[0] == "cli" for p in SETUPTOOLS["packages"])
    module = importlib.import_module(module_name)
    assert isinstance(getattr(module, attribute), typer.Typer)
    where = Path(module.__file__).resolve().parent
    assert where == ROOT / "cli", (f"{package} is imported from {where}, not from this checkout's cli/: install "
                                   "this checkout (pip install -e .) so that its tests run its own command line")


def test_every_folder_of_the_library_and_its_data_files_are_packaged():
    library = ROOT / "lora_rlhf"
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in library.rglob("*.py")}
    assert folders == set(SETUPTOOLS["packages"]) - {"lora_rlhf_cli"}
    patterns = SETUPTOOLS["package-data"]["lora_rlhf"]
    data = [p.relative_to(library) for p in library.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data, "the library ships data files (the labelling page, the planner's model configs)"
    for path in data:
        assert any(path.match(pattern) for pattern in patterns), f"lora_rlhf/{path} is left out of the wheel"
