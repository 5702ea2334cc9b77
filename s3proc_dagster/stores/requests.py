"""The image requests aggregate of the store contract: a request, its CSV rows and their outputs.

A backend supplies insert, load and a compare-and-set on the request's status; the
lifecycle is checked here against `lifecycle.REQUEST_TRANSITIONS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from s3proc_dagster.errors import ConcurrencyConflict, RecordNotFound
from s3proc_dagster.models import Request, RequestData, RequestStatus, utcnow
from s3proc_dagster.stores.cas import CAS_ATTEMPTS
from s3proc_dagster.stores.lifecycle import check_request_transition


class RequestStore(ABC):
    """Where every image request and its rows are tracked."""

    # ---- primitives a backend provides -------------------------------------------------

    @abstractmethod
    def _insert_request(self, request: Request, rows: list[RequestData]) -> None: ...

    @abstractmethod
    def _cas_request(self, request_id: str, expected: RequestStatus, fields: dict[str, Any]) -> bool: ...

    @abstractmethod
    def get_request(self, request_id: str) -> Request | None: ...

    @abstractmethod
    def list_request_rows(self, request_id: str) -> list[RequestData]: ...

    @abstractmethod
    def list_requests(self) -> list[Request]: ...

    @abstractmethod
    def _update_row(self, request_id: str, serial_number: int, fields: dict[str, Any]) -> bool: ...

    # ---- rules ---------------------------------------------------------------------------

    def create_request(self, request: Request, rows: Iterable[RequestData]) -> Request:
        self._insert_request(request, list(rows))
        return self.require_request(request.request_id)

    def require_request(self, request_id: str) -> Request:
        found = self.get_request(request_id)
        if found is None:
            raise RecordNotFound(f"no image request with requestId {request_id!r}")
        return found

    def set_request_status(self, request_id: str, new: RequestStatus, **fields: Any) -> Request:
        for _ in range(CAS_ATTEMPTS):
            current = self.require_request(request_id)
            check_request_transition(f"request {request_id}", current.status, new)
            if self._cas_request(request_id, current.status, {**fields, "status": new, "updated_at": utcnow()}):
                return self.require_request(request_id)
        raise ConcurrencyConflict(f"request {request_id}: too many concurrent changes")

    def set_row_outputs(
        self,
        request_id: str,
        serial_number: int,
        output_image_urls: list[str | None],
        errors: list[str | None],
        completed: bool,
    ) -> None:
        fields: dict[str, Any] = {"output_image_urls": output_image_urls, "errors": errors}
        if completed:
            fields["completed_at"] = utcnow()
        if not self._update_row(request_id, serial_number, fields):
            raise RecordNotFound(f"no row {serial_number} in request {request_id!r}")
