"""README.md runs as pasted: its shell and Python blocks run in order, in a copy of a fresh checkout.

The copy has the repository's files, the real ``../shared`` beside it, this test session's virtual
environment as ``.venv``, and a smoke-size digits run as ``runs/digits`` (the Quickstart's first line
would train the real one for minutes). Installs are skipped too. Python blocks that start with ``# NAME.py`` are saved as that file. Skipped: the Quickstart's
lines (they install), downloads (``curl``), commands
that train or benchmark for minutes (``bindkit run``, ``bindkit bench``, the lock refresh that
downloads), and blocks the README marks ``<!-- long: ... -->``. Everything else must exit 0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# the docs pages whose commands run after README's, in this order (the tutorial has its own test, tests/test_tutorial.py;
# docs/api/ holds mkdocstrings directives, no commands)
DOC_PAGES = [
    "index",
    "concepts",
    "data",
    "encoders",
    "recipes",
    "search",
    "serve",
    "released-spaces",
    "scale",
    "reliability",
    "benchmarks",
    "layout",
]
PAGES = [README, *(REPO / "docs" / f"{name}.md" for name in DOC_PAGES)]
BLOCK = re.compile(r"(<!-- long:[^>]*-->\n)?^```(\w*)\n(.*?)^```$", re.S | re.M)
SKIP_COMMANDS = (
    "bindkit run ",
    "bindkit bench ",
    "pip install uv",
    "python3 -m venv ",
    ".venv/bin/pip install",
    "python -m pip ",  # installs into the reader's own environment (tests/test_install.py builds the wheel)
    "curl ",  # downloads (ImageBind's weights)
    "torchrun ",  # trains, on several machines
    "/usr/bin/time -v .venv/bin/bindkit run ",  # a training run, timed
)


def readme_blocks() -> list[tuple[str, str, bool]]:
    """(language, text, marked long) of every fenced block of README and the docs pages, in reading order."""
    return [(lang, text, bool(long)) for page in PAGES for long, lang, text in BLOCK.findall(page.read_text())]


def test_every_docs_page_is_run_or_named_and_every_relative_link_resolves():
    pages = {p.stem for p in (REPO / "docs").glob("*.md")}
    assert pages == {*DOC_PAGES, "tutorial", "recipe-keys"}  # a new page is added to DOC_PAGES, so its commands run
    for page in [README, *(REPO / "docs").rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: link to {target} resolves to nothing"


def test_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= 300  # guides, figures and dates live on the docs pages


def shell_commands(text: str) -> list[str]:
    """Commands of a bash block: continuation lines joined, comments and skipped commands dropped."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith(SKIP_COMMANDS):
            commands.append(line)
    return commands


def test_quickstart_has_two_command_lines_and_ci_runs_the_second():
    quickstart = README.read_text().split("## Quickstart", 1)[1]
    block = BLOCK.search(quickstart)
    lines = [line for line in block[3].splitlines() if line.strip()]
    assert len(lines) == 2
    assert "-c constraints.txt" in lines[0] and "bindkit run recipes/digits.yaml" in lines[0]
    assert "-c constraints.txt" in lines[1] and "pytest" in lines[1]
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert lines[1] in ci_lines  # CI runs exactly what a newcomer runs


@pytest.fixture
def checkout(tmp_path, tiny_run, data_root) -> Path:
    """A copy of the repository, as a newcomer has it after the Quickstart, with a tiny runs/digits."""
    repo = tmp_path / "bindkit"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, repo / name)
    (repo / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "shared").symlink_to(data_root.parent)
    shutil.copytree(tiny_run, repo / "runs" / "digits")
    return repo


def test_readme_blocks_run_as_pasted(checkout):
    env = {k: v for k, v in os.environ.items() if k not in ("BINDKIT_DATA", "VIRTUAL_ENV")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `source .venv/bin/activate`
    blocks = readme_blocks()
    assert sum(long for _, _, long in blocks) <= 2, "keep the README's untested blocks few"
    ran = 0
    for index, (lang, text, long) in enumerate(blocks):
        if long:
            continue
        if lang == "bash":
            for command in shell_commands(text):
                done = subprocess.run(
                    ["bash", "-c", f"set -eo pipefail; {command}"],
                    cwd=checkout,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert done.returncode == 0, f"README block {index}: {command}\n{done.stderr[-2000:]}"
                ran += 1
        elif lang == "python" and re.match(r"# \w+\.py\n", text):  # a file to save, as the README says
            (checkout / text.split()[1]).write_text(text)
        elif lang == "python":
            done = subprocess.run(
                [sys.executable, "-c", text], cwd=checkout, env=env, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, f"README block {index}:\n{text}\n{done.stderr[-2000:]}"
            ran += 1
    assert ran >= 10
    assert (checkout / "runs" / "prompts.names.txt").read_text().splitlines()[7] == "a handwritten seven"
