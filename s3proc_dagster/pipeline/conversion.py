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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from s3proc_dagster.errors import ConversionError
from s3proc_dagster.files.chunks import ChunkSink
from s3proc_dagster.files.detect import is_tabular
from s3proc_dagster.files.tabular import ConversionResult, convert_to_parquet_chunks
from s3proc_dagster.files.validation import as_of_date, rule_set_for
from s3proc_dagster.logs import about, get_logger, progress_logger
from s3proc_dagster.pipeline.cache import parquet_dir, staged_items
from s3proc_dagster.pipeline.context import StepContext
from s3proc_dagster.pipeline.records import ConversionRecipe, FileVersion, PreparedItem, WorkItem
from s3proc_dagster.transfer.keys import join_key

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
) -> list[PreparedItem]:
    """Tabular items become Parquet chunks; other items pass through, ready to upload."""
    ctx.hold(version.file_id, version.sha256)
    recipe = dataclasses.replace(recipe, as_of=recipe.as_of or as_of_date(None))
    prepared: list[PreparedItem] = []
    for item in items:
        key = join_key(ctx.prefix, item.relative_path)
        # Known before anything is written, so crash recovery can find partial output.
        ctx.store.update_file(item.file_id, output_key=key)
        if not is_tabular(item.kind):
            prepared.append(PreparedItem(item, key))
            continue
        prepared.append(_convert_item(ctx, version, item, key, recipe, landing))
    return prepared


def _convert_item(
    ctx: StepContext,
    version: FileVersion,
    item: WorkItem,
    key: str,
    recipe: ConversionRecipe,
    landing: Landing | None,
) -> PreparedItem:
    done = parquet_dir(version, item) / "_done.json"
    sent_ahead: frozenset[int] = frozenset()
    if done.exists():
        conversion = ConversionResult.from_json(done.read_text())
    else:
        staged_items(ctx, version, [item])
        ahead = landing(PreparedItem(item, key, compression=recipe.compression), recipe.chunk_size) if landing else None
        conversion = convert(item, parquet_dir(version, item), recipe, ahead)
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
    )


def convert(
    item: WorkItem, out_dir: Path, recipe: ConversionRecipe, sink: ChunkLanding | None = None
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
    conversion = convert(item.item, parquet_dir(version, item.item), item.recipe)
    bounds = [(c.chunk_index, c.start_offset, c.end_offset) for c in item.chunks]
    if [(c.chunk_index, c.start_offset, c.end_offset) for c in conversion.chunks] != bounds:
        raise ConversionError(
            f"{item.item.relative_path}: converting again gave other chunk boundaries than the first conversion"
        )
    return dataclasses.replace(item, chunks=tuple(conversion.chunks))
