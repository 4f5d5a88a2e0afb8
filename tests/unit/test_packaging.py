"""Install metadata: pins agree everywhere, every imported package is declared; the README and CI say the same
commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def setup_pins() -> dict[str, str]:
    requirements = [*project()["dependencies"], *sum(project()["optional-dependencies"].values(), [])]
    return dict(re.findall(r"^([a-z0-9-]+)==([0-9.]+)", "\n".join(requirements), re.MULTILINE))


DISTRIBUTION = {"yaml": "pyyaml", "megatron": "megatron-core", "PEER_pytorch": "peer-pytorch"}
"""Import names that differ from their distribution's."""
NEVER_DECLARED = {"apex": "NVIDIA apex: optional, built from source; the PyPI 'apex' is another package"}


def test_every_imported_package_is_declared():
    """Each third-party package megamoe imports (at any depth) is a dependency or an extra's."""
    import ast

    declared = {re.match(r"[A-Za-z0-9_.-]+", r)[0].lower().replace("_", "-")
                for r in [*project()["dependencies"], *sum(project()["optional-dependencies"].values(), [])]}
    imported = set()
    for path in (ROOT / "megamoe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            imported |= {name.split(".")[0] for name in names}
    third_party = imported - set(sys.stdlib_module_names) - {"megamoe"} - NEVER_DECLARED.keys()
    undeclared = {n for n in third_party if DISTRIBUTION.get(n, n).lower().replace("_", "-") not in declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"
    assert {"tqdm", "tokenizers", "matplotlib"} <= third_party  # the scan sees imports inside functions


def test_dockerfile_pins_equal_setup_py():
    docker = dict(re.findall(r'"([a-z0-9-]+)==([0-9.]+)"', (ROOT / "docker" / "Dockerfile").read_text()))
    pins = setup_pins()
    assert docker and all(pins[name] == version for name, version in docker.items()), (docker, pins)
    assert {"megatron-core", "deepspeed"} <= docker.keys()


def test_no_pypi_apex_anywhere():
    for path in [ROOT / "pyproject.toml", ROOT / "setup.py", ROOT / "tools" / "install.sh", ROOT / ".ci" / "run",
                 ROOT / "docker" / "Dockerfile"]:
        for line in path.read_text().splitlines():
            assert not re.search(r"pip install[^#]*\s[\"']?apex\b", line), f"{path.name}: {line}"


def test_ci_runs_the_readme_commands():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(bash tools/install.sh[^\n]*)\n```", readme)
    assert len(commands) == 2, commands  # (a) the demo, (b) the test suite
    assert commands[1] in ci, f"CI does not run the README test command: {commands[1]}"


def test_the_configuration_reference_is_current():
    from megamoe.config.reference import markdown

    reference = (ROOT / "docs" / "configuration.md").read_text()
    assert markdown() in reference, "run: python tools/config_reference.py --update"


def test_ruff_clean():
    import subprocess

    proc = subprocess.run([_beside_python("ruff"), "check", "--output-format", "concise", str(ROOT)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_dev_install_brings_everything_the_tests_import():
    """CI installs `.[dev]` only: a test importing a package from another extra fails there, not here."""
    import ast
    import importlib.metadata as metadata
    import sys

    def requirements(extra: str | None) -> set[str]:
        """Distributions `.[extra]` installs (the core ones for None), through extras naming other extras."""
        out = set()
        for text in metadata.requires("megamoe"):  # e.g. 'transformers~=5.25.0; extra == "hf"'
            name, _, marker = text.partition(";")
            if (not marker) if extra is None else f'extra == "{extra}"' in marker:
                if (inner := re.match(r"\s*megamoe\[([^\]]+)\]", name)) is not None:  # dev = megamoe[hf,...]
                    out |= set().union(*(requirements(e.strip()) for e in inner[1].split(",")))
                else:
                    out.add(re.match(r"[A-Za-z0-9._-]+", name).group().lower())
        return out

    installed = requirements(None) | requirements("dev")
    distributions = metadata.packages_distributions()
    missing = set()
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for top in {name.split(".")[0] for name in names}:
                if top in sys.stdlib_module_names or top in ("megamoe", "tests", "tools", "launchers"):
                    continue
                dists = {d.lower() for d in distributions.get(top, [top])}
                if not dists & installed:
                    missing.add(f"{path.relative_to(ROOT)} imports {top}")
    assert not missing, f"not in pyproject.toml's core or dev requirements: {sorted(missing)}"


def _beside_python(tool: str) -> str:
    import shutil
    import sys
    from pathlib import Path

    import pytest

    beside = Path(sys.executable).parent / tool  # the venv's bin/ need not be on PATH
    found = str(beside) if beside.is_file() else shutil.which(tool)
    if found is None:
        pytest.skip(f"{tool} is not installed (bash tools/install.sh dev installs it)")
    return found


def test_dockerfile_passes_hadolint():
    """docker/Dockerfile cannot be built here (no Docker engine): lint it."""
    import subprocess

    proc = subprocess.run([_beside_python("hadolint"), str(ROOT / "docker" / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shell_scripts_pass_shellcheck():
    import subprocess

    scripts = [ROOT / ".ci" / "run", ROOT / "tools" / "install.sh", *sorted((ROOT / "launchers").rglob("*.sh")),
               *sorted((ROOT / "launchers").rglob("*.sbatch"))]
    assert len(scripts) >= 4
    proc = subprocess.run([_beside_python("shellcheck"), "--shell=bash", *map(str, scripts)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_demo_help_prints_once_and_deletes_nothing(tmp_path):
    """launchers/demo.sh --help: the help once (not once per launched rank), and the last demo's outputs kept."""
    import os
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "launchers", repo / "launchers")
    shutil.copytree(ROOT / "megamoe", repo / "megamoe", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "runs" / "tiny-moe").mkdir(parents=True)
    (repo / "runs" / "tiny-moe" / "metrics.jsonl").write_text("{}\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(repo / "launchers" / "demo.sh"), "--help"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("usage: launchers/demo.sh") == 1 and proc.stdout.count("usage: pretrain.py") == 1
    assert (repo / "runs" / "tiny-moe" / "metrics.jsonl").is_file()
