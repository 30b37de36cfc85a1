"""The README and the manual in docs/: every relative link lands on a file (and heading) that exists, the README
links every page and stays short, each page says first what it is for, and the README's test command is the one
.ci/run runs."""

import glob
import os
import re

from conftest import REPO_ROOT

README = os.path.join(REPO_ROOT, "README.md")
DOCS = os.path.join(REPO_ROOT, "docs")
README_MAX_LINES = 150  # issue 41: a README a newcomer reads in five minutes

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`]+`")  # as in markdown, a code span may cross a line break
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _markdown_files():
    return [README, *sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))]


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _prose(text):
    """The text without code blocks and code spans, where brackets and '#' are code, not links and headings."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _anchors(text):
    """The anchors GitHub gives the headings of a markdown page: lower case, punctuation dropped, spaces to hyphens,
    a repeated one numbered."""
    anchors, seen = set(), {}
    for heading in HEADING.findall(FENCE.sub("", text)):  # a code span in a heading counts by its text
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # and a link by its text
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path):
    return [target for target in LINK.findall(_prose(_read(path))) if not SCHEME.match(target)]


def test_every_relative_link_points_at_a_file_and_heading_that_exist():
    broken = []
    for path in _markdown_files():
        for target in _links(path):
            file_part, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            where = f"{os.path.relpath(path, REPO_ROOT)}: ({target})"
            if not os.path.exists(resolved):
                broken.append(f"{where}: no {os.path.relpath(resolved, REPO_ROOT)}")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(_read(resolved)):
                broken.append(f"{where}: no heading #{anchor} in {os.path.relpath(resolved, REPO_ROOT)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_anchors_follow_githubs_headings():
    page = "# Top\n\n## Keras: `make_private` and `model.fit`\n\n```bash\n# a comment, not a heading\n```\n\n## Top\n"
    assert _anchors(page) == {"top", "keras-make_private-and-modelfit", "top-1"}


def test_readme_links_every_docs_page_and_stays_short():
    readme = _read(README)
    linked = {os.path.normpath(os.path.join(REPO_ROOT, target.partition("#")[0])) for target in _links(README)}
    pages = sorted(glob.glob(os.path.join(DOCS, "*.md")))
    unlinked = [os.path.relpath(page, REPO_ROOT) for page in pages if page not in linked]
    assert pages and not unlinked, f"README does not link {unlinked}"
    lines = len(readme.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_each_docs_page_opens_with_its_title_and_one_sentence_on_what_it_is_for():
    for page in sorted(glob.glob(os.path.join(DOCS, "*.md"))):
        paragraphs = [p.strip() for p in _read(page).split("\n\n") if p.strip()]
        name = os.path.relpath(page, REPO_ROOT)
        assert paragraphs[0].startswith("# ") and "\n" not in paragraphs[0], f"{name} does not open with a title"
        opening = " ".join(paragraphs[1].split())
        assert not opening.startswith(("#", "|", "-", "`", "<")), f"{name}: no opening sentence after the title"
        assert len(re.findall(r"[.?!](?=\s|$)", opening)) == 1 and opening.endswith("."), \
            f"{name} opens with more or less than one sentence: {opening!r}"


def test_readme_test_command_is_the_one_ci_runs():
    ci = _read(os.path.join(REPO_ROOT, ".ci", "run"))
    # .ci/run's first suite, in a subshell, with pip quietened (-q changes only what pip prints)
    command = re.search(r"^\((python3 -m venv \.venv && .*pytest.*)\)$", ci, re.M).group(1)
    command = command.replace("pip install -q ", "pip install ")
    readme_commands = [line for block in re.findall(r"^```bash\n(.*?)^```", _read(README), re.M | re.S)
                       for line in block.splitlines()]
    assert command in readme_commands, f"README does not show .ci/run's command {command!r}"
