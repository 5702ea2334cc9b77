"""Where a run's steps keep their outputs: JSON records, never pickles.

"Re-execute from failure" loads a step's output back in a process that holds the S3 and
MongoDB credentials. A pickle there is code: whoever can write the bytes runs code in the
worker. So outputs are written and read as JSON through the output's own type
annotation (pydantic's `TypeAdapter`): loading can only ever build the records the steps
declare (`FileVersion`, `list[PreparedItem]`, ...), and a value of another shape fails
to load. The records are small (paths into staging, checksums, chunk bounds), so JSON
costs nothing a run would notice.

One machine (`DEPLOYMENT=single`) keeps them under DAGSTER_HOME's storage; a shared
deployment, where a re-execution may land on another node, in S3 under
S3_STEP_OUTPUTS_PREFIX, which is outside S3_PREFIX by default and never below the incoming
prefix (settings.py), so no producer's file can map there.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import TypeAdapter

from s3proc_dagster.transfer.keys import join_key


@functools.cache
def _adapter(typing_type: Any) -> TypeAdapter:
    return TypeAdapter(typing_type)


class JsonStepOutputs(dg.IOManager):
    """Outputs as JSON documents named by run, step, output and mapping key, as Dagster's
    own filesystem I/O manager names its pickles; `write`/`read` are the one storage."""

    def __init__(self, write: Any, read: Any) -> None:
        self._write, self._read = write, read

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if context.dagster_type.is_nothing:
            return
        self._write(
            "/".join(context.get_identifier()) + ".json", _adapter(context.dagster_type.typing_type).dump_json(obj)
        )

    def load_input(self, context: dg.InputContext) -> Any:
        upstream = context.upstream_output
        assert upstream is not None
        # the type it was written as: a fan-in input's own type is the list of them
        return _adapter(upstream.dagster_type.typing_type).validate_json(
            self._read("/".join(context.get_identifier()) + ".json")
        )


def local_outputs(root: Path) -> JsonStepOutputs:
    def write(name: str, data: bytes) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return JsonStepOutputs(write, lambda name: (root / name).read_bytes())


def outputs_in_s3(client: Any, bucket: str, prefix: str) -> JsonStepOutputs:
    def write(name: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=join_key(prefix, name), Body=data, ContentType="application/json")

    def read(name: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=join_key(prefix, name))["Body"].read()

    return JsonStepOutputs(write, read)
