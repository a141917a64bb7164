"""The documentation points where it says, and CI runs the commands it gives.

README.md and docs/*.md link to each other, to source files, to images and to sections of bench/RESULTS.md; a
moved file or a renamed heading would break those links silently. `.ci/run` runs the install and test commands
the documentation gives: each of its stages names, in a `# --- FILE: ...` comment, the page whose commands it
mirrors, and every command of the stage must appear there verbatim. Plain text, no imports of the package: fast.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(([^()\s]+)\)")  # [text](target), ![alt](target)


def outside_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.M | re.S)


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans, where links are links."""
    return re.sub(r"`[^`\n]*`", "", outside_code_blocks(text))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for line in outside_code_blocks(path.read_text()).splitlines():
        match = re.match(r"^#{1,6} (.*)$", line)
        if match:
            anchor = github_anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text()))


def test_the_pages_exist():
    names = {p.name for p in PAGES if p.parent.name == "docs"}
    assert {"README.md", "results.md", "testing.md", "serving.md", "vllm.md", "configuration.md",
            "evaluation.md", "kernel.md", "limits.md", "tensor-parallel.md"} <= names


def test_github_anchor_matches_githubs_rule():
    assert github_anchor("Serving, second GPU session: `transformers serve` (issues 19, 20)") == \
        "serving-second-gpu-session-transformers-serve-issues-19-20"
    assert github_anchor("Long context on the 0.5B with the defaults (YaRN ×4), 64K") == \
        "long-context-on-the-05b-with-the-defaults-yarn-4-64k"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def shell_commands(page: Path) -> set[str]:
    """The commands of a page's bash blocks, without trailing comments, continuation lines joined."""
    commands = set()
    for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            commands.update(part.strip() for part in command.split(" && ") if part.strip())
    return commands


def ci_stages() -> list[tuple[str, list[str]]]:
    """.ci/run's stages: (the page a `# --- PAGE: ...` comment names, the commands that follow it)."""
    stages = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        marker = re.match(r"^# --- (\S+): ", line)
        if marker:
            stages.append((marker.group(1), []))
        elif stages and re.match(r"^(pip |python|run_tests )", line):
            command = re.sub(r"\s*\|\|.*$", "", line.removeprefix("run_tests ")).strip()
            stages[-1][1].append(command)
    return stages


def test_ci_runs_the_commands_the_documentation_gives():
    stages = ci_stages()
    assert len(stages) >= 3 and all(commands for _, commands in stages), stages
    for page, commands in stages:
        path = ROOT / page
        assert path.exists(), f".ci/run names {page}, which does not exist"
        missing = [c for c in commands if c not in shell_commands(path)]
        assert not missing, f".ci/run runs {missing}, which {page} does not give verbatim"
