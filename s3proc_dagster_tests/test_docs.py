"""What the README promises a newcomer, checked: one screen, every page linked, links that
lead somewhere, and a code map true of the tree. Plain file reads: no server, milliseconds.

The code map is the fenced block under "## Where things are", one line per folder: the
folder's path from the repository root (ending in `/`), then the names of its files and
subfolders; a line that starts with a space continues the folder above; words in
parentheses describe and are not names. A folder's line stands for its `__init__.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PACKAGE = "s3proc_dagster"
MAX_README_LINES = 300

# Planning documents are named by their concept ("the specification's FileStatus document"),
# never by number. `--seed N` (a benchmark's random seed) and "seeds of" are ordinary words.
FORBIDDEN = re.compile(r"\bseed 0\d\d\b|(?<!--)\bseeds?\b(?! of)|\bissue \d+", re.IGNORECASE)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
TEST_NAME = re.compile(r"\btest_[a-z0-9_]+(?:\.py)?\b")


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces
    to hyphens, a repeated heading numbered."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2))  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path: Path) -> Iterator[tuple[int, str]]:
    for number, line in prose_lines(path):
        for target in LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                yield number, target


def code_map() -> dict[str, list[str]]:
    """The README's code map: folder (from the repository root) -> names on its lines."""
    text = README.read_text()
    section = text.split("\n## Where things are", 1)[1]
    block = re.search(r"^```[^\n]*\n(.*?)^```", section, re.S | re.M)
    assert block, "README: no fenced code map under '## Where things are'"
    folders: dict[str, list[str]] = {}
    current = None
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        names = re.sub(r"\([^()]*\)", " ", line).split()
        if not line[0].isspace():
            current, *names = names
            assert current.endswith("/"), f"code map: a folder's line starts with its path, not {current!r}"
            assert current not in folders, f"code map: {current} has two lines"
            folders[current] = []
        assert current is not None, f"code map: {line.strip()!r} continues no folder"
        folders[current].extend(names)
    return folders


def test_readme_fits_on_a_few_screens() -> None:
    lines = len(README.read_text().splitlines())
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_the_wording_rule_catches_planning_numbers_and_spares_a_random_seed_flag() -> None:
    for bad in ("seed 000", "Seed 002's Requests", "issue 14", "the seeds say", "a seed-000 ChunkStatus"):
        assert FORBIDDEN.search(bad), bad
    for fine in ("--seed 34837", "[--seed N]", "the seeds of a design", "issues", "a tissue 14"):
        assert not FORBIDDEN.search(fine), fine


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_no_planning_document_is_named_by_number(path: Path) -> None:
    hits = [
        f"{path.name}:{number}: {match.group(0)!r}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for match in FORBIDDEN.finditer(line)
    ]
    assert not hits, "name the concept instead (the specification's FileStatus document):\n" + "\n".join(hits)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(README.parent / target.split("#")[0]).resolve() for _, target in relative_links(README)}
    missing = [page.name for page in DOCS if page.resolve() not in linked]
    assert not missing, f"README.md links no docs/{missing}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(path: Path) -> None:
    broken = []
    for number, target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{path.name}:{number}: {target} (no such file)")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{path.name}:{number}: {target} (no such heading in {destination.name})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_test_the_docs_name_exists(path: Path) -> None:
    tests = ROOT / "s3proc_dagster_tests"
    defined = {m for f in tests.glob("*.py") for m in re.findall(r"^\s*def (test_\w+)", f.read_text(), re.M)}
    missing = [
        name
        for name in sorted(set(TEST_NAME.findall(path.read_text())))
        if not ((tests / name).exists() if name.endswith(".py") else name in defined)
    ]
    assert not missing, f"{path.name} names tests that do not exist: {missing}"


def test_the_code_map_names_only_what_exists() -> None:
    missing = []
    for folder, names in code_map().items():
        if not (ROOT / folder).is_dir():
            missing.append(folder)
            continue
        missing += [folder + name for name in names if not (ROOT / folder / name.rstrip("/")).exists()]
    assert not missing, f"README's code map names what does not exist: {missing}"


def test_the_code_map_names_every_module_of_the_package() -> None:
    folders = code_map()
    unnamed = []
    for module in sorted((ROOT / PACKAGE).rglob("*.py")):
        relative = module.relative_to(ROOT)
        folder = f"{relative.parent.as_posix()}/"
        if folder not in folders:
            unnamed.append(f"{folder} (no line)")
        elif module.name != "__init__.py" and module.name not in folders[folder]:
            unnamed.append(relative.as_posix())
    assert not unnamed, f"README's code map does not name: {sorted(set(unnamed))}"


# ---- docs/settings.md and .env.example against the settings schema ----------------------------
SETTINGS_DOC = ROOT / "docs" / "settings.md"
ENV_EXAMPLE = ROOT / ".env.example"
ROW = re.compile(r"^\|\s*((?:`[A-Z][A-Z0-9_]*`(?:,\s*)?)+)\s*\|\s*([^|]*?)\s*\|")
EXAMPLE_LINE = re.compile(r"^(?:#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


def schema_variables() -> set[str]:
    """Every variable the settings schema reads; a landing zone's ZONE_* come from its run config."""
    from s3proc_dagster.settings import _GROUPS

    return {
        f"{prefix}{field}".upper()
        for group, (cls, prefix) in _GROUPS.items()
        if group != "zone"
        for field in cls.model_fields
    }


def documented_settings() -> dict[str, str]:
    """docs/settings.md's tables: variable -> its default cell."""
    rows = {}
    for _, line in prose_lines(SETTINGS_DOC):
        if match := ROW.match(line):
            for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", match.group(1)):
                rows[name] = match.group(2)
    return rows


def example_values() -> dict[str, str]:
    """.env.example's lines, commented-out ones included: variable -> value."""
    return {m.group(1): m.group(2) for line in ENV_EXAMPLE.read_text().splitlines() if (m := EXAMPLE_LINE.match(line))}


def test_settings_md_and_env_example_name_every_setting_and_only_real_ones() -> None:
    schema, documented, example = schema_variables(), documented_settings(), example_values()
    assert not schema - documented.keys(), f"docs/settings.md does not document {sorted(schema - documented.keys())}"
    assert not schema - example.keys(), f".env.example does not list {sorted(schema - example.keys())}"
    assert not set(example) - set(documented), (
        f".env.example lists what docs/settings.md does not: {sorted(set(example) - set(documented))}"
    )


def test_settings_md_states_the_defaults_env_example_holds() -> None:
    """A default cell that is one literal (`50000`, `ZSTD`, `68719476736` (64 GiB)) or says
    `empty` holds what .env.example's line holds; the next test ties that to the code."""
    example = example_values()
    wrong = []
    for name, cell in documented_settings().items():
        if name not in example:
            continue
        literal = re.fullmatch(r"`([^`]*)`(?: \([^)]*\))?", cell)
        if cell.startswith("empty") and example[name] != "":
            wrong.append(f"{name}: docs say empty, .env.example {example[name]!r}")
        elif literal and example[name] and literal.group(1) != example[name]:
            wrong.append(f"{name}: docs say {literal.group(1)!r}, .env.example {example[name]!r}")
    assert not wrong, "\n".join(wrong)


def test_env_example_holds_the_code_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """.env.example copied to .env, with only the two required keys filled in, loads exactly
    the settings an empty environment loads."""
    from s3proc_dagster.settings import load_configuration

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "incoming").mkdir(parents=True)
    example = example_values()
    for name in example:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("NODE_ENV", raising=False)
    monkeypatch.setenv("S3_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "secret")

    def dump() -> dict[str, object]:
        cfg = load_configuration(env_file=None)
        groups = ("s3", "monitoring", "processing", "logging", "images")
        return {g: getattr(cfg, g).model_dump() for g in groups}

    defaults = dump()
    uncommented = [line for line in ENV_EXAMPLE.read_text().splitlines() if not line.startswith("#")]
    for line in uncommented:
        if (match := EXAMPLE_LINE.match(line)) and match.group(1) not in ("S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(match.group(1), match.group(2))
    assert dump() == defaults
