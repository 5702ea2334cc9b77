"""`image_request_job`: validate the product CSV, fan out per row, finalize the request."""

import json
from pathlib import Path

import dagster as dg

from s3proc_dagster.defs.resources import ProgressStoreResource, S3Storage, Settings
from s3proc_dagster.images import processor
from s3proc_dagster.images.request_csv import InvalidRequestCsv
from s3proc_dagster.models import RequestData, RequestStatus


class ImageRequestConfig(dg.Config):
    """A CSV to submit (`path`), or a request already recorded by `s3proc images submit`."""

    path: str = ""
    request_id: str = ""


def _options(settings: Settings) -> processor.ImageOptions:
    cfg = settings.config
    return processor.ImageOptions(
        bucket=cfg.s3.bucket,
        prefix=cfg.s3.prefix,
        quality=cfg.images.quality,
        output_format=cfg.images.output_format or None,
        public_base_url=cfg.s3.public_base_url,
        fetch_timeout_s=cfg.images.fetch_timeout_ms / 1000,
        max_bytes=cfg.images.max_bytes,
        retries=cfg.processing.max_retries,
        retry_delay_s=cfg.processing.retry_delay_ms / 1000,
        allow_private_urls=cfg.images.allow_private_urls,
    )


@dg.op(out=dg.DynamicOut(RequestData))
def validate_request(context: dg.OpExecutionContext, config: ImageRequestConfig, progress_store: ProgressStoreResource):
    """Every problem of the CSV, by row, before any image is fetched."""
    store = progress_store.open()
    request_id = config.request_id or processor.new_request_id()
    if not store.get_request(request_id):
        path = Path(config.path)
        try:
            processor.submit(store, path.read_bytes(), path.name, request_id)
        except InvalidRequestCsv as exc:
            raise dg.Failure(description=str(exc), metadata={"requestId": request_id}, allow_retries=False) from exc
    context.instance.add_run_tags(context.run_id, {"s3proc/request_id": request_id})
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
    webhook = settings.config.images.webhook_url
    if webhook:
        from s3proc_dagster.images.webhook import post_result

        payload = {
            **request.to_document(),
            "rows": [r.to_document() for r in store.list_request_rows(request_id)],
        }
        post_result(webhook, json.dumps(payload).encode(), attempts=settings.config.processing.max_retries + 1)
    if request.status is RequestStatus.FAILED:
        raise dg.Failure(description=f"request {request_id}: no image succeeded", allow_retries=False)
