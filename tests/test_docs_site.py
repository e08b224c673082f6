"""The documentation site builds with ``mkdocs build --strict``, and strict mode fails on a broken link or anchor.

``mkdocs.yml`` turns broken links, missing anchors and pages left out of the nav into warnings, which
``--strict`` makes fatal; the API reference pages render the docstrings through mkdocstrings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0, not a build warning
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_site_builds_strictly_with_the_api_reference(tmp_path):
    done = build(REPO / "mkdocs.yml", tmp_path / "site")
    print(done.stderr)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-4000:]}"
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    assert nav[0] == {"Home": "index.md"}
    api = (tmp_path / "site" / "api" / "model" / "index.html").read_text()
    assert "from_pretrained" in api and "load_run" in api  # the docstrings were rendered, not just the headings


@pytest.mark.parametrize("link", ["missing.md", "index.md#no-such-section"])
def test_a_broken_link_fails_the_strict_build(tmp_path, link):
    """A copy of the docs with one more page, in the nav, whose only link goes nowhere: the build must fail."""
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    for package in ("bind", "encoders"):  # mkdocstrings reads the sources beside mkdocs.yml (paths: ["."])
        (tmp_path / package).symlink_to(REPO / package)
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    config["nav"].append({"Broken": "broken.md"})
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    (tmp_path / "docs" / "broken.md").write_text(f"# Broken\n\nSee [the other page]({link}).\n")
    done = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0, "mkdocs build --strict passed a broken link: check mkdocs.yml's validation"
    assert "broken.md" in done.stderr and link.split("#")[-1] in done.stderr, done.stderr[-4000:]
