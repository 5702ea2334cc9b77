"""`image_request_job`: validate the product CSV, fan out per row, finalize the request."""

import json
from pathlib import Path
from typing import Any

import dagster as dg

from s3proc_dagster.defs.resources import ProgressStoreResource, S3Storage, Settings
from s3proc_dagster.images import processor
from s3proc_dagster.images.request_csv import InvalidRequestCsv
from s3proc_dagster.models import Request, RequestData, RequestStatus
from s3proc_dagster.names import REQUEST_ID_TAG
from s3proc_dagster.settings import S3Config
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.zones.declared import declared_directories

REQUEST_TAG = REQUEST_ID_TAG


class ImageRequestConfig(dg.Config):
    """A CSV to submit (`path`), or a request already recorded by `s3proc images submit`."""

    path: str = ""
    request_id: str = ""


def _default_s3_sources(s3: S3Config) -> tuple[str, ...]:
    """Where producers' images are by default: S3_PREFIX of the bucket, and the incoming prefix."""
    roots = [f"{s3.bucket}/{s3.prefix}"]
    if s3.incoming_prefix:
        roots.append(f"{s3.incoming_bucket_name}/{s3.incoming_prefix}")
    return tuple(roots)


def _options(settings: Settings) -> processor.ImageOptions:
    cfg = settings.config
    return processor.ImageOptions(
        bucket=cfg.s3.bucket,
        prefix=cfg.s3.prefix,
        quality=cfg.images.quality,
        output_format=cfg.images.output_format or None,
        public_base_url=cfg.s3.public_base_url,
        fetch_timeout_s=cfg.images.fetch_timeout_ms / 1000,
        fetch_deadline_s=cfg.images.fetch_deadline_ms / 1000,
        max_bytes=cfg.images.max_bytes,
        retries=cfg.processing.max_retries,
        retry_delay_s=cfg.processing.retry_delay_ms / 1000,
        allow_private_urls=cfg.images.allow_private_urls,
        s3_sources=tuple(u.removeprefix("s3://") for u in cfg.images.s3_sources) or _default_s3_sources(cfg.s3),
        s3_refused=(f"{cfg.s3.bucket}/{cfg.s3.step_outputs_prefix}",),
        csv_max_bytes=cfg.images.csv_max_bytes,
        csv_max_rows=cfg.images.csv_max_rows,
    )


def _send_webhook(settings: Settings, store: ProgressStore, request: Request, log: Any) -> None:
    """The request's final JSON, with its rows, to IMAGE_WEBHOOK_URL when it is set."""
    webhook = settings.config.images.webhook_url
    if not webhook:
        return
    from s3proc_dagster.images.webhook import post_result

    payload = {**request.to_document(), "rows": [r.to_document() for r in store.list_request_rows(request.request_id)]}
    status = post_result(webhook, json.dumps(payload).encode(), attempts=settings.config.processing.max_retries + 1)
    if not 200 <= status < 400:
        log.warning(f"request {request.request_id}: webhook answered {status or 'nothing'}")


@dg.op(out=dg.DynamicOut(RequestData))
def validate_request(
    context: dg.OpExecutionContext,
    config: ImageRequestConfig,
    progress_store: ProgressStoreResource,
    settings: Settings,
):
    """Every problem of the CSV, by row, before any image is fetched."""
    store = progress_store.open()
    request_id = config.request_id or processor.new_request_id()
    context.instance.add_run_tags(context.run_id, {REQUEST_TAG: request_id})  # first: the failure hook reads it
    if not store.get_request(request_id):
        options = _options(settings)
        # below a watched directory, read without following a link on the way (`sources.confined`)
        roots = (settings.config.monitoring.watch_path, *declared_directories())
        try:
            processor.submit_file(
                store, Path(config.path), request_id, options.csv_max_bytes, options.csv_max_rows, roots
            )
        except InvalidRequestCsv as exc:
            raise dg.Failure(description=str(exc), metadata={"requestId": request_id}, allow_retries=False) from exc
    store.set_request_status(request_id, RequestStatus.PROCESSING)
    for row in store.list_request_rows(request_id):
        yield dg.DynamicOutput(row, mapping_key=f"row_{row.serial_number}")


@dg.op
def process_image_row(
    context: dg.OpExecutionContext,
    row: RequestData,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
    settings: Settings,
) -> RequestData:
    done = processor.process_row(
        progress_store.open(), row, s3.get_client(), _options(settings), settings.staging / "images"
    )
    for n, (url, out, err) in enumerate(
        zip(done.input_image_urls, done.output_image_urls, done.errors, strict=True), start=1
    ):
        if out:
            context.log_event(
                dg.AssetMaterialization(
                    asset_key=dg.AssetKey(["images", done.request_id]),
                    description=f"row {done.serial_number} image {n}",
                    metadata={"serialNumber": done.serial_number, "input": url, "output": dg.MetadataValue.url(out)},
                )
            )
        else:
            context.log.warning(f"row {done.serial_number} image {n}: {err}")
    return done


@dg.op
def finalize_request(
    context: dg.OpExecutionContext,
    rows: list[RequestData],
    progress_store: ProgressStoreResource,
    s3: S3Storage,
    settings: Settings,
) -> None:
    store = progress_store.open()
    request_id = rows[0].request_id
    request = processor.finalize(store, request_id, s3.get_client(), _options(settings), settings.staging / "images")
    context.log.info(f"request {request_id}: {request.status.value}, output {request.output_csv_url}")
    _send_webhook(settings, store, request, context.log)
    if request.status is RequestStatus.FAILED:
        raise dg.Failure(description=f"request {request_id}: no image succeeded", allow_retries=False)


@dg.failure_hook(required_resource_keys={"progress_store", "settings", "s3"})
def settle_failed_request(context: dg.HookContext) -> None:
    """When any step fails: a request the run leaves unsettled is FAILED with the step and
    the reason, and the webhook is sent, so no request stays PROCESSING after its run.
    A request finalize_request settled, or a refused CSV, is left as it is (`give_up`)."""
    run = context.instance.get_run_by_id(context.run_id)
    request_id = run.tags.get(REQUEST_TAG) if run else None
    if not request_id:
        return  # failed before a request id was chosen: there is no request to settle
    error = context.op_exception
    message = getattr(error, "description", None) or (str(error) if error else "unknown error")
    settings: Settings = context.resources.settings
    store = context.resources.progress_store.open()
    request = processor.give_up(
        store,
        request_id,
        f"{context.step_key}: {message}",
        context.resources.s3,  # a hook gets what the resource creates: the boto3 client
        _options(settings),
        settings.staging / "images",
    )
    if request is None:
        return
    context.log.error(f"request {request_id}: failed in {context.step_key}: {message}")
    _send_webhook(settings, store, request, context.log)
