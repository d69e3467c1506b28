"""One Perspective version on both sides, and CI runs what the README says."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pinned_python_version() -> str:
    match = re.search(r"^perspective-python==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert match, "requirements.txt must pin perspective-python with =="
    return match.group(1)


def test_index_html_and_requirements_name_the_same_perspective_version():
    urls = re.findall(r"https://cdn\.jsdelivr\.net/npm/(@perspective-dev/[a-z0-9-]+)@([^/\"']+)/",
                      (ROOT / "index.html").read_text())
    packages = {package for package, _ in urls}
    assert {"@perspective-dev/client", "@perspective-dev/viewer", "@perspective-dev/viewer-datagrid",
            "@perspective-dev/viewer-d3fc"} <= packages
    assert {version for _, version in urls} == {pinned_python_version()}


def test_the_browser_tests_install_the_same_perspective_version():
    dependencies = json.loads((ROOT / "tests" / "package.json").read_text())
    versions = {name: version for section in ("dependencies", "devDependencies")
                for name, version in dependencies.get(section, {}).items() if name.startswith("@perspective-dev/")}
    assert versions and set(versions.values()) == {pinned_python_version()}


def test_every_runtime_requirement_is_pinned():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^\s]*", line), line


def readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\s*```(?:sh|bash)?\n(.+?)\n```", readme, re.S)
    assert match, "README.md must mark its test command with <!-- test-command -->"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    assert readme_test_command() in (ROOT / ".ci" / "run").read_text()


def test_the_browser_tests_install_every_package_the_page_loads():
    """The browser test serves index.html's CDN URLs from tests/node_modules."""
    loaded = set(re.findall(r"https://cdn\.jsdelivr\.net/npm/(@perspective-dev/[a-z0-9-]+)@",
                            (ROOT / "index.html").read_text()))
    installed = set(json.loads((ROOT / "tests" / "package.json").read_text()).get("devDependencies", {}))
    assert loaded <= installed, f"add to tests/package.json: {sorted(loaded - installed)}"
