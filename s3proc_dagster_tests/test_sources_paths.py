"""`sources.paths`: what a path means relative to the watched directory, and which records
a user's argument names. Plain functions on plain paths: no store, no S3, no Dagster."""

from __future__ import annotations

from pathlib import Path

import pytest

from s3proc_dagster.files.globs import path_matches
from s3proc_dagster.models import FileStatus, make_file_id
from s3proc_dagster.sources.paths import (
    path_below,
    relative_to_watch,
    resolve_user_path,
)


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """A project directory as `scripts/dev` lays it out: data/incoming watched, data/errors beside it."""
    project = tmp_path / "project"
    (project / "data" / "incoming" / "nyc").mkdir(parents=True)
    (project / "data" / "errors").mkdir(parents=True)
    return {"project": project, "watch": project / "data" / "incoming", "errors": project / "data" / "errors"}


def record(path: str, rel: str) -> FileStatus:
    """A record as the pipeline writes it: the stored path, and the fileId of the relative path."""
    return FileStatus(file_id=make_file_id(rel), file_path=path, file_name=rel.rsplit("/", 1)[-1])


def test_relative_to_watch_is_the_posix_path_below_the_watched_directory(layout: dict[str, Path]) -> None:
    assert relative_to_watch(layout["watch"] / "nyc" / "flights.csv", layout["watch"]) == "nyc/flights.csv"


def test_relative_to_watch_of_a_file_outside_is_its_name(layout: dict[str, Path], tmp_path: Path) -> None:
    assert relative_to_watch(tmp_path / "elsewhere" / "flights.csv", layout["watch"]) == "flights.csv"
    assert path_below(tmp_path / "elsewhere" / "flights.csv", layout["watch"]) is None


def test_relative_to_watch_sees_through_a_symlinked_watch_path(layout: dict[str, Path], tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(layout["watch"])
    assert relative_to_watch(layout["watch"] / "nyc" / "a.csv", link) == "nyc/a.csv"
    assert relative_to_watch(link / "nyc" / "a.csv", layout["watch"]) == "nyc/a.csv"


@pytest.mark.parametrize(
    "arg, cwd",
    [
        ("{watch}/nyc/flights.csv", "{project}"),  # absolute
        ("data/incoming/nyc/flights.csv", "{project}"),  # relative to the current directory
        ("./data/incoming/../incoming/nyc/flights.csv", "{project}"),  # with dots
        ("flights.csv", "{watch}/nyc"),  # relative to the current directory, inside the watched one
        ("nyc/flights.csv", "/"),  # relative to WATCH_PATH, as run tags and asset keys show it
        ("data/errors/nyc/flights.csv", "{project}"),  # parked in the error directory after a failure
        ("{fileId}", "/"),
    ],
)
def test_every_spelling_of_a_watched_file_names_its_record(layout: dict[str, Path], arg: str, cwd: str) -> None:
    flights = record(str(layout["watch"] / "nyc" / "flights.csv"), "nyc/flights.csv")
    other = record(str(layout["watch"] / "nyc" / "other.csv"), "nyc/other.csv")
    names = {**{k: str(v) for k, v in layout.items()}, "fileId": flights.file_id}
    ref = resolve_user_path(arg.format(**names), layout["watch"], Path(cwd.format(**names)), layout["errors"])
    assert ref.matches(flights)
    assert not ref.matches(other)


def test_a_relative_path_finds_a_file_that_came_from_s3_by_its_file_id(layout: dict[str, Path]) -> None:
    """The same relative path below the incoming prefix gives the same fileId."""
    from_s3 = record("s3://bucket/incoming/nyc/flights.csv", "nyc/flights.csv")
    assert resolve_user_path("nyc/flights.csv", layout["watch"], layout["project"]).matches(from_s3)
    assert resolve_user_path("s3://bucket/incoming/nyc/flights.csv", layout["watch"], Path("/")).matches(from_s3)
    assert not resolve_user_path("s3://bucket/incoming/nyc/other.csv", layout["watch"], Path("/")).matches(from_s3)


@pytest.mark.parametrize(
    "arg",
    ["{watch}/bundle.zip!/a/b.csv", "bundle.zip!/a/b.csv", "data/incoming/bundle.zip!/a/b.csv", "bundle.zip!/a//b.csv"],
)
def test_an_archive_entry_is_named_by_archive_path_bang_entry_path(layout: dict[str, Path], arg: str) -> None:
    entry = record(f"{layout['watch']}/bundle.zip!/a/b.csv", "bundle.zip/a/b.csv")
    sibling = record(f"{layout['watch']}/bundle.zip!/a/c.csv", "bundle.zip/a/c.csv")
    archive = record(f"{layout['watch']}/bundle.zip", "bundle.zip")
    ref = resolve_user_path(arg.format(watch=layout["watch"]), layout["watch"], layout["project"])
    assert ref.matches(entry)
    assert not ref.matches(sibling) and not ref.matches(archive)


def test_an_entry_of_an_archive_that_came_from_s3_is_named_by_its_uri(layout: dict[str, Path]) -> None:
    entry = record("s3://bucket/in/bundle.zip!/a/b.csv", "bundle.zip/a/b.csv")
    assert resolve_user_path("s3://bucket/in/bundle.zip!/a/b.csv", layout["watch"], Path("/")).matches(entry)


def test_a_same_named_file_elsewhere_does_not_name_a_watched_file(layout: dict[str, Path], tmp_path: Path) -> None:
    watched = record(str(layout["watch"] / "nyc" / "flights.csv"), "nyc/flights.csv")
    top = record(str(layout["watch"] / "flights.csv"), "flights.csv")
    assert not resolve_user_path(str(tmp_path / "flights.csv"), layout["watch"], Path("/")).matches(watched)
    assert not resolve_user_path(str(tmp_path / "flights.csv"), layout["watch"], Path("/")).matches(top)
    assert not resolve_user_path("flights.csv", layout["watch"], Path("/")).matches(watched)
    assert resolve_user_path("flights.csv", layout["watch"], Path("/")).matches(top)


def test_a_file_processed_from_outside_the_watched_directory_is_found_by_its_path(tmp_path: Path) -> None:
    watch = tmp_path / "incoming"
    outside = record(str(tmp_path / "elsewhere" / "x.csv"), "x.csv")
    assert resolve_user_path("elsewhere/x.csv", watch, tmp_path).matches(outside)
    assert resolve_user_path(str(tmp_path / "elsewhere" / "x.csv"), watch, Path("/")).matches(outside)


@pytest.mark.parametrize(
    ("path", "pattern", "matches"),
    [
        ("march/promo.csv", "**/promo*.csv", True),
        ("promo.csv", "**/promo*.csv", True),
        ("march/promo.csv", "*.csv", False),  # `*` stays within one folder
        ("a/b/c.tsv", "**", True),
        ("ok\ns3:/victim/x\n.csv", "**", True),  # a newline in a name: matched, then refused by name
        ("in/ok\nx.csv", "in/*.csv", True),
    ],
)
def test_a_glob_matches_folders_as_users_write_them_and_names_with_any_character(
    path: str, pattern: str, matches: bool
) -> None:
    assert path_matches(path, pattern) is matches
