"""The repository explains itself (docs/README.md): its files cite only documents inside it,
every relative link of its markdown resolves to a file (and heading) that exists, and every
doc under docs/ can be reached from the README.
"""

from __future__ import annotations

import functools
import pathlib
import re

from shared.settings import REPO_ROOT

# Directories that are not the project's own text: environments, caches, build output, data.
SKIPPED_DIRS = {
    ".git",
    ".venv",
    "build",
    "var",
    "node_modules",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
}

# Documents that live outside the repository (beside a checkout, not in a clone), cited by name
# or by path. Spelled in pieces so that this file does not cite them itself.
_OUTSIDE = ("DESIGN", "API", "STYLE")
OUTSIDE_CITATION = re.compile(
    r"\b(?:" + "|".join(_OUTSIDE) + r")\.md\b"  # the three files by name
    r"|\b" + _OUTSIDE[0] + r" ?§"  # the design by section number
    r"|(?<![\w./])\.\./" + "shared" + r"\b"  # the folder beside the checkout, by path
)

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def project_files() -> list[pathlib.Path]:
    found = []
    for path in REPO_ROOT.rglob("*"):
        relative = path.relative_to(REPO_ROOT)
        if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in relative.parts):
            continue
        if path.is_file():
            found.append(path)
    return found


def text_of(path: pathlib.Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary (a database, an image): nothing to cite


@functools.cache
def project_texts() -> tuple[tuple[pathlib.Path, str], ...]:
    """Every text file of the project but this one, read once for all the checks."""
    this = pathlib.Path(__file__).resolve()
    found = []
    for path in project_files():
        text = text_of(path) if path.resolve() != this else None
        if text is not None:
            found.append((path, text))
    return tuple(found)


def markdown_files() -> list[pathlib.Path]:
    files = [REPO_ROOT / "README.md"]
    files += sorted((REPO_ROOT / "docs").rglob("*.md"))
    files += sorted((REPO_ROOT / "services").glob("*/README.md"))
    return files


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(text):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: pathlib.Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [
        target
        for target in LINK.findall(text)
        if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I)  # http:, https:, mailto:
    ]


def resolve(source: pathlib.Path, target: str) -> tuple[pathlib.Path, str]:
    file_part, _, anchor = target.partition("#")
    destination = (source.parent / file_part).resolve() if file_part else source
    return destination, anchor


def test_no_file_cites_documents_outside_the_repository():
    citations = []
    for path, text in project_texts():
        if not OUTSIDE_CITATION.search(text):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_CITATION.search(line):
                citations.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert citations == [], "cite docs/ instead:\n" + "\n".join(citations)


def test_every_relative_link_resolves():
    broken = []
    for source in markdown_files():
        for target in relative_links(source):
            destination, anchor = resolve(source, target)
            where = f"{source.relative_to(REPO_ROOT)}: {target}"
            if not destination.exists():
                broken.append(f"{where} (no such file)")
            elif not destination.is_relative_to(REPO_ROOT):
                broken.append(f"{where} (outside the repository)")
            elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
                broken.append(f"{where} (no heading with anchor #{anchor})")
    assert broken == [], "\n".join(broken)


def test_every_doc_is_reachable_from_the_readme():
    docs = set((REPO_ROOT / "docs").rglob("*.md"))
    reached: set[pathlib.Path] = set()
    queue = [REPO_ROOT / "README.md"]
    while queue:
        source = queue.pop()
        if source in reached or not source.is_file() or source.suffix != ".md":
            continue
        reached.add(source)
        for target in relative_links(source):
            destination, _ = resolve(source, target)
            if destination.is_dir():
                destination = destination / "README.md"
            queue.append(destination)
    unreached = sorted(str(p.relative_to(REPO_ROOT)) for p in docs - reached)
    assert unreached == [], "link these from docs/README.md: " + ", ".join(unreached)


DOC_CITATION = re.compile(r"(?<![\w/.])(docs/[\w./-]*\w\.md)")


def test_every_cited_doc_exists():
    """Code comments cite docs/ by path; a citation of a file that is not there (renamed, or
    never written) is as lost as one of a file outside the repository."""
    missing = []
    for path, text in project_texts():
        if "docs/" not in text:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for cited in DOC_CITATION.findall(line):
                if not (REPO_ROOT / cited).is_file():
                    missing.append(f"{path.relative_to(REPO_ROOT)}:{number}: {cited}")
    assert missing == [], "\n".join(missing)


CODE_PATH = re.compile(r"`((?:services|shared|tests|deploy|protos|docs)/[\w./-]+)")


def test_paths_the_docs_name_exist():
    """Docs name the code that applies a rule; when the code moves, the doc moves with it."""
    missing = []
    for source in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]:
        for name in sorted(set(CODE_PATH.findall(source.read_text(encoding="utf-8")))):
            if not (REPO_ROOT / name.rstrip(".")).exists():
                missing.append(f"{source.relative_to(REPO_ROOT)}: {name}")
    assert missing == [], "\n".join(missing)


def test_the_checks_catch_what_they_look_for(tmp_path):
    # The patterns themselves: a citation of each kind is found, a path inside the repo is not.
    outside = "DESIGN" + ".md §2", "see API" + ".md", "STYLE" + ".md pattern 9", "DESIGN" + " §4"
    for line in (*outside, "beside it in ../" + "shared/"):
        assert OUTSIDE_CITATION.search(line), line
    for line in ("../.." + "/shared/validity.py", "docs/design/time.md", "shared/money.py"):
        assert not OUTSIDE_CITATION.search(line), line
    assert slug("Events (`WatchEvents`)") == "events-watchevents"
    assert slug("Health, probes and shutdown") == "health-probes-and-shutdown"
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[x](other.md#nowhere) [y](#a-title) `[z](inline.md)`\n")
    assert relative_links(page) == ["other.md#nowhere", "#a-title"]
    assert anchors(page) == {"a-title"}
    assert DOC_CITATION.findall('(docs/faults.md, "Streams"); see ../../docs/security.md') == [
        "docs/faults.md"
    ]
    assert CODE_PATH.findall("see `shared/db.py` and `services/quota/app/`") == [
        "shared/db.py",
        "services/quota/app/",
    ]
