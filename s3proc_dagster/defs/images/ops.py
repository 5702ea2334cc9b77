"""`image_request_job`: validate the product CSV, fan out per row, finalize the request."""

import json
from pathlib import Path

import dagster as dg

from s3proc_dagster.defs.resources import ImageSettings, PipelineSettings, ProgressStoreResource, S3Storage
from s3proc_dagster.images import processor
from s3proc_dagster.images.request_csv import InvalidRequestCsv
from s3proc_dagster.models import RequestData, RequestStatus


class ImageRequestConfig(dg.Config):
    """A CSV to submit (`path`), or a request already recorded by `s3proc images submit`."""

    path: str = ""
    request_id: str = ""


def _options(s3: S3Storage, images: ImageSettings) -> processor.ImageOptions:
    return processor.ImageOptions(
        bucket=s3.bucket,
        prefix=s3.prefix,
        quality=images.quality,
        output_format=images.output_format or None,
        public_base_url=s3.public_base_url,
        fetch_timeout_s=images.fetch_timeout_ms / 1000,
        max_bytes=images.max_bytes,
        retries=images.max_retries,
        retry_delay_s=images.retry_delay_ms / 1000,
        allow_private_urls=images.allow_private_urls,
    )


@dg.op(out=dg.DynamicOut(RequestData))
def validate_request(
    context: dg.OpExecutionContext, config: ImageRequestConfig, progress_store: ProgressStoreResource
):
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
    settings: PipelineSettings,
    images: ImageSettings,
) -> RequestData:
    done = processor.process_row(
        progress_store.open(), row, s3.get_client(), _options(s3, images), settings.staging / "images"
    )
    for n, (url, out, err) in enumerate(zip(done.input_image_urls, done.output_image_urls, done.errors), start=1):
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
    settings: PipelineSettings,
    images: ImageSettings,
) -> None:
    store = progress_store.open()
    request_id = rows[0].request_id
    request = processor.finalize(store, request_id, s3.get_client(), _options(s3, images), settings.staging / "images")
    context.log.info(f"request {request_id}: {request.status.value}, output {request.output_csv_url}")
    if images.webhook_url:
        from s3proc_dagster.images.webhook import post_result

        payload = {
            **request.to_seed(),
            "rows": [r.to_seed() for r in store.list_request_rows(request_id)],
        }
        post_result(images.webhook_url, json.dumps(payload).encode(), attempts=images.max_retries + 1)
    if request.status is RequestStatus.FAILED:
        raise dg.Failure(description=f"request {request_id}: no image succeeded", allow_retries=False)


@dg.job(
    name="image_request_job",
    description="Seed 002: compress every image listed in a product CSV and record the output URLs.",
    executor_def=dg.in_process_executor,
    tags={"s3proc/job": "images"},
)
def image_request_job() -> None:
    rows = validate_request().map(process_image_row)
    finalize_request(rows.collect())
