"""Repository conventions that CI relies on."""

from __future__ import annotations

import re

from conftest import REPO_ROOT


def _readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)
    return [line for block in blocks for line in block.splitlines()
            if line.strip() and not line.startswith("#")]


def test_readme_quick_start_has_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    ci_script = (REPO_ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci_script


def test_reference_package_is_never_imported_by_the_extension_package():
    pattern = re.compile(
        r"^\s*(from|import)\s+facedeblur_ref\b|import_module\(.facedeblur_ref", re.M
    )
    for path in (REPO_ROOT / "facedeblur_ext").rglob("*.py"):
        assert not pattern.search(path.read_text()), path
