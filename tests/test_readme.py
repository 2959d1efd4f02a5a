"""The README's first screen holds exactly the two set-up commands, and CI runs the test one."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if inside and line.startswith("python3 -m venv"):
            lines.append(line.strip())
    return lines


def test_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:40])
    demo, tests = _commands(first_screen)
    assert demo.endswith("scratchlm demo") and "torch==2.13.0" in demo
    assert tests.endswith("python -m pytest") and "torch==2.13.0" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_docs_links_resolve():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in _links(page.read_text()):
            if "://" in target or target.startswith("#"):
                continue
            assert (page.parent / target.split("#")[0]).exists(), f"{page.name} links to missing {target}"


def _links(text: str) -> list[str]:
    import re

    return re.findall(r"\]\(([^)\s]+)\)", text)
