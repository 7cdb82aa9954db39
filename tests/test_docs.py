"""The documents as a reader meets them: the README is a short front door whose
first two commands are the main job and the test command CI runs, and every
relative link in every Markdown file leads to a file that exists and, with an
#anchor, to a heading in it (GitHub's slugs). Pure Python, no engine."""

from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest
from helpers import ROOT

README = ROOT / "README.md"
MAX_README_LINES = 250
MAIN_JOB = "python run_qwen2_audio.py --audio-count 2"
TEST_COMMAND = "bash tests/run.sh"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
SCHEME = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")


def markdown_files() -> list[Path]:
    """Every Markdown file of the repository: tracked or about to be (not
    ignored); without git, every one outside hidden folders."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        files = {ROOT / name for name in listed}
    except (OSError, subprocess.CalledProcessError):
        files = {p for p in ROOT.rglob("*.md") if not any(part.startswith(".") for part in p.parts)}
    return sorted(p for p in files if p.is_file())


def split_fences(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The text outside fenced code blocks (blocks blanked, so line numbers
    hold), and the blocks as (language, content) in order."""
    prose, blocks = [], []
    fence = language = None
    body: list[str] = []
    for line in text.splitlines():
        opened = FENCE.match(line)
        if fence is None and opened:
            fence, language, body = opened.group(1), opened.group(2).lower(), []
            prose.append("")
        elif fence is not None:
            closing = line.strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                blocks.append((language, "\n".join(body)))
                fence = None
            else:
                body.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def without_code_spans(text: str) -> str:
    return CODE_SPAN.sub(" ", re.sub(r"<!--.*?-->", " ", text, flags=re.S))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: its rendered words, lower case,
    punctuation dropped, each space a hyphen."""
    text = CODE_SPAN.sub(lambda m: m.group(2).strip(), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text).replace("*", "").lower()
    kept = (
        ch for ch in text if ch.isalnum() or ch in " -_" or unicodedata.category(ch).startswith("M")
    )
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file; a repeated one gets -1, -2, ..."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose.splitlines():
        heading = HEADING.match(line)
        if not heading:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    """The link targets of a Markdown file that point inside the repository."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    prose = without_code_spans(prose)
    targets = INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)
    return [t for t in targets if t and not SCHEME.match(t)]


def resolve(document: Path, target: str) -> tuple[Path, str]:
    """The file a relative link names (the document itself for '#anchor') and its anchor."""
    name, _, anchor = target.partition("#")
    name = unquote(name)
    if not name:
        return document, anchor
    base = ROOT if name.startswith("/") else document.parent
    return (base / name.lstrip("/")).resolve(), anchor


def shell_blocks(path: Path) -> list[str]:
    _, blocks = split_fences(path.read_text(encoding="utf-8"))
    return [content.strip() for language, content in blocks if language in SHELL_LANGUAGES]


DOCUMENTS = markdown_files()
DOCUMENT_IDS = [str(p.relative_to(ROOT)) for p in DOCUMENTS]


def test_heading_slugs_follow_githubs_rules():
    assert slug("Will it fit? (`--dry-run`)") == "will-it-fit---dry-run"
    assert slug("Scoring against references (WER/CER)") == "scoring-against-references-wercer"
    assert slug("vLLM's own batch runner, 1.16x") == "vllms-own-batch-runner-116x"
    assert slug("The [engine](x.md) on *CPU*") == "the-engine-on-cpu"
    assert slug("snake_case and Ünïcode") == "snake_case-and-ünïcode"


def test_a_repeated_heading_gets_a_numbered_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Notes\n\n## Notes\n\n```bash\n# not a heading\n```\n")
    assert anchors(page) == {"notes", "notes-1"}


def test_links_in_code_are_not_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](a.md) `[b](b.md)`\n\n```\n[c](c.md)\n```\n[d](https://x.org/d.md)\n")
    assert relative_links(page) == ["a.md"]


def test_the_readme_is_a_front_door_of_at_most_250_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_the_readme_opens_with_the_main_job_then_the_test_command():
    first, second = shell_blocks(README)[:2]
    assert "\n" not in first and first.endswith(MAIN_JOB), first
    assert second == TEST_COMMAND


def test_ci_runs_the_test_command_the_readme_gives():
    test_command = shell_blocks(README)[1]
    commands = [
        line.strip()
        for line in (ROOT / ".ci/run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert commands == [test_command]


def test_the_readme_links_every_document_in_docs():
    linked = {resolve(README, target)[0] for target in relative_links(README)}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=DOCUMENT_IDS)
def test_every_relative_link_names_a_file_of_the_repository(document):
    broken = []
    for target in relative_links(document):
        path, _ = resolve(document, target)
        if not path.exists() or not path.is_relative_to(ROOT.resolve()):
            broken.append(target)
    assert not broken, f"{document.relative_to(ROOT)}: {broken}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=DOCUMENT_IDS)
def test_every_anchor_names_a_heading_of_its_document(document):
    broken = []
    for target in relative_links(document):
        path, anchor = resolve(document, target)
        if anchor and path.suffix == ".md" and path.is_file() and anchor not in anchors(path):
            broken.append(target)
    assert not broken, f"{document.relative_to(ROOT)}: {broken}"
