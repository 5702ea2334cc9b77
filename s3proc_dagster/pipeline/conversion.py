"""Step 4, parquet_conversion: tabular items become Parquet chunks, in one pass each.

Validation rides the same pass when a rule set selects the file (`files.validation`).
A finished conversion is kept beside its parts (`_done.json`), so a re-executed step
reuses it instead of converting again; the chunk plan belongs to this version, so chunks
that landed for an earlier version of the file are never taken for this one's.

The conversion knows nothing of S3: it hands each chunk, as soon as it is whole, to a
`ChunkLanding` the caller made (`upload.landing`), so a big file's upload overlaps its
conversion, and is told when the pass is void.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from s3proc_dagster.errors import ConversionError
from s3proc_dagster.files.chunks import ChunkSink
from s3proc_dagster.files.detect import is_tabular
from s3proc_dagster.files.lineage import Lineage
from s3proc_dagster.files.tabular import ConversionResult, convert_to_parquet_chunks
from s3proc_dagster.files.validation import as_of_date, rule_set_for
from s3proc_dagster.logs import about, get_logger, progress_logger
from s3proc_dagster.models import utcnow
from s3proc_dagster.pipeline.cache import parquet_dir, staged_items
from s3proc_dagster.pipeline.context import StepContext
from s3proc_dagster.pipeline.records import ConversionRecipe, FileVersion, PreparedItem, WorkItem
from s3proc_dagster.sources.paths import ENTRY_SEPARATOR
from s3proc_dagster.transfer.keys import join_key
from s3proc_dagster.zones.drift import guard

log = get_logger("pipeline")
progress = progress_logger("pipeline")


class ChunkLanding(ChunkSink, Protocol):
    """Where whole chunks go while the pass goes on, and what became of them."""

    def landed(self) -> frozenset[int]:
        """Wait for every chunk handed over; the indexes of those that landed."""

    def discard(self) -> None:
        """The pass failed: undo what landed."""


#: Makes the landing of one item's chunks (`upload.landing`), or None to land none early.
Landing = Callable[[PreparedItem, int], ChunkLanding | None]


def convert_items(
    ctx: StepContext,
    version: FileVersion,
    items: list[WorkItem],
    recipe: ConversionRecipe,
    landing: Landing | None = None,
    columns_before: Sequence[tuple[str, str]] | None = None,
    blocking_drift: bool = False,
) -> list[PreparedItem]:
    """Tabular items become Parquet chunks; other items pass through, ready to upload.

    `columns_before` are the zone's last landing's: a file whose columns differ carries
    the difference (`PreparedItem.schema_drift`), or is refused before anything is
    written when `blocking_drift` (`zones.drift`)."""
    ctx.hold(version.file_id, version.sha256)
    landed_at = recipe.landed_at or (utcnow() if recipe.lineage_columns else None)
    recipe = dataclasses.replace(recipe, as_of=recipe.as_of or as_of_date(None), landed_at=landed_at)
    drift: dict[str, str] = {}
    check = partial(guard, columns_before, blocking_drift, drift) if columns_before else None
    prepared: list[PreparedItem] = []
    for item in items:
        key = join_key(ctx.prefix, item.relative_path)
        # Known before anything is written, so crash recovery can find partial output.
        ctx.store.update_file(item.file_id, output_key=key)
        if not is_tabular(item.kind):
            prepared.append(PreparedItem(item, key))
            continue
        item_check = partial(check, item.relative_path) if check else None
        converted = _convert_item(ctx, version, item, key, recipe, landing, item_check)
        prepared.append(dataclasses.replace(converted, schema_drift=drift.get(item.relative_path, "")))
    return prepared


def _convert_item(
    ctx: StepContext,
    version: FileVersion,
    item: WorkItem,
    key: str,
    recipe: ConversionRecipe,
    landing: Landing | None,
    check_columns: Callable[[list[tuple[str, str]], bool], None] | None = None,
) -> PreparedItem:
    done = parquet_dir(version, item) / "_done.json"
    sent_ahead: frozenset[int] = frozenset()
    if done.exists():
        conversion = ConversionResult.from_json(done.read_text())
    else:
        staged_items(ctx, version, [item])
        ahead = landing(PreparedItem(item, key, compression=recipe.compression), recipe.chunk_size) if landing else None
        lineage = _lineage(version, item, recipe)
        conversion = convert(item, parquet_dir(version, item), recipe, ahead, lineage, check_columns)
        sent_ahead = ahead.landed() if ahead else frozenset()
    ctx.store.plan_chunks(item.file_id, conversion.record_count, recipe.chunk_size, version=item.version)
    fields: dict[str, Any] = {"content_type": item.content_type, "file_type": item.file_type}
    if conversion.skipped_rules:
        # Not a failure: the rule set said to skip rules a file lacks columns for. Recorded
        # beside the counts, as how many records each rule was not evaluated on.
        summary = ctx.store.require(item.file_id).error_summary
        skipped = dict.fromkeys(conversion.skipped_rules, conversion.record_count)
        fields["error_summary"] = {**summary, "skippedRules": skipped}
        log.warning(
            "%s: rules skipped: %s",
            item.relative_path,
            "; ".join(f"{r} ({why})" for r, why in conversion.skipped_rules.items()),
            extra=about(item.file_id),
        )
    ctx.store.update_file(item.file_id, **fields)
    return PreparedItem(
        item,
        key,
        conversion.record_count,
        recipe.compression,
        tuple(conversion.chunks),
        conversion.skipped_rules,
        recipe,
        sent_ahead,
        ctx.claimant.run_id if sent_ahead else "",
        conversion.numbers_as_text,
        tuple(conversion.columns),
    )


def _lineage(version: FileVersion, item: WorkItem, recipe: ConversionRecipe) -> Lineage | None:
    """Where rows come from, on every row, when the zone asks (`files.lineage`): the
    zone-relative path, or the URI of the object it arrived as (an entry's: `<uri>!/<entry>`)."""
    if not recipe.lineage_columns or recipe.landed_at is None:
        return None
    source = version.source
    origin = item.relative_path
    if source.is_object:
        entry = item.relative_path.removeprefix(source.relative_path + "/")
        origin = source.uri if item.file_id == version.file_id else f"{source.uri}{ENTRY_SEPARATOR}{entry}"
    return Lineage(origin, version.sha256, recipe.landed_at)


def convert(
    item: WorkItem,
    out_dir: Path,
    recipe: ConversionRecipe,
    sink: ChunkLanding | None = None,
    lineage: Lineage | None = None,
    check_columns: Callable[[list[tuple[str, str]], bool], None] | None = None,
) -> ConversionResult:
    """One conversion pass into `out_dir`, its result kept beside the parts (`_done.json`);
    with `sink`, each whole chunk lands while the pass goes on."""
    rule_set = rule_set_for(item.relative_path, recipe.rules_dir) if recipe.rules_dir else None
    try:
        conversion = convert_to_parquet_chunks(
            Path(item.local_path),
            item.kind,
            out_dir,
            recipe.chunk_size,
            recipe.compression,
            rules=rule_set.render(recipe.as_of or as_of_date(None)) if rule_set else None,
            required_columns=rule_set.columns if rule_set else (),
            on_missing_columns=rule_set.on_missing_columns if rule_set else "skip_rules",
            csv_null_strings=recipe.csv_null_strings,
            sink=sink,
            lineage=lineage,
            check_columns=check_columns,
        )
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # a failed pass leaves no partial parts
        if sink:
            sink.discard()  # ... locally nor in S3
        raise
    (out_dir / "_done.json").write_text(conversion.to_json())
    for column, words in conversion.numbers_as_text.items():
        log.warning(
            "%s: column %s landed as text, its values are numbers but for %s (CSV_NULL_STRINGS reads those as NULL)",
            item.relative_path,
            column,
            ", ".join(map(repr, words)),
            extra=about(item.file_id),
        )
    progress.info(
        "%s: %d records in %d chunks (%.2fs)",
        item.relative_path,
        conversion.record_count,
        len(conversion.chunks),
        conversion.duration_s,
        extra=about(item.file_id, compression=recipe.compression),
    )
    return conversion


def convert_again(ctx: StepContext, version: FileVersion, item: PreparedItem) -> PreparedItem:
    """The item with its chunk files made again on this node from the snapshot, by its
    recipe: the same boundaries as the first conversion, or a ConversionError."""
    if item.recipe is None:
        raise ConversionError(f"{item.item.relative_path}: chunk files missing and no recipe to convert them again")
    staged_items(ctx, version, [item.item])
    lineage = _lineage(version, item.item, item.recipe)
    conversion = convert(item.item, parquet_dir(version, item.item), item.recipe, None, lineage)
    bounds = [(c.chunk_index, c.start_offset, c.end_offset) for c in item.chunks]
    if [(c.chunk_index, c.start_offset, c.end_offset) for c in conversion.chunks] != bounds:
        raise ConversionError(
            f"{item.item.relative_path}: converting again gave other chunk boundaries than the first conversion"
        )
    return dataclasses.replace(item, chunks=tuple(conversion.chunks))
