"""The OpenAI Batch API: /v1/files (purpose "batch") and /v1/batches, over gemmarun/batch/store.py
(state on disk) and gemmarun/batch/worker.py (lines through the server's engine at low priority).

Uploads are multipart/form-data, parsed with the standard library's email parser rather than
adding python-multipart for one route.
"""

from __future__ import annotations

import tempfile
from email import policy
from email.parser import BytesParser

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse

from ..batch.store import COMPLETION_WINDOW, NotFound, Store
from .limits import read_body
from .requests import json_body
from .responses import APIError

MAX_UPLOAD = 200 * 2**20  # OpenAI's limit on a batch input file
MAX_LINES = 50_000  # OpenAI's limit on requests per batch


class BatchService:
    """The store and its worker for one server; without a data_dir, a temporary folder (lost on exit).
    data_dir=False turns the Batch API off (Ray Serve replicas: each would keep batches of its own)."""

    def __init__(self, server, data_dir=None):
        self.store = self.worker = None
        if data_dir is False:
            return
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gemmarun-batches-")
            data_dir = self._tmp.name
        from ..batch.worker import BatchWorker  # here: gemmarun.batch imports the server's request parsing

        self.store = Store(data_dir)
        self.worker = BatchWorker(self.store, server.engine, server.tokenizer, server.model_id)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _form(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """multipart/form-data fields: name -> (filename, bytes)."""
    if not content_type.startswith("multipart/form-data"):
        raise APIError(400, "upload the file as multipart/form-data with fields 'file' and 'purpose'", code="invalid_request")
    message = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
    fields = {}
    for part in message.iter_parts() if message.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def batch_router(service: BatchService) -> APIRouter:
    from ..batch.lines import ENDPOINTS, BatchInputError, parse_lines

    def available() -> None:
        if service.store is None:
            raise APIError(400, "this server has no Batch API (Ray Serve replicas would each keep their own); "
                           "use `gemmarun serve` on one machine, or `gemmarun batch --ray`", code="batch_api_unavailable")  # fmt: skip

    router = APIRouter(dependencies=[Depends(available)])
    store, worker = service.store, service.worker

    @router.post("/files")
    async def upload(request: HTTPRequest):
        raw = await read_body(request, MAX_UPLOAD)  # a 413 as soon as the upload is known to be larger
        fields = _form(request.headers.get("content-type", ""), raw)
        if "file" not in fields:
            raise APIError(400, "the form has no 'file' field", param="file")
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if purpose != "batch":
            raise APIError(400, f"purpose {purpose!r} is not supported; gemmarun stores files for purpose 'batch'", param="purpose")
        filename, content = fields["file"]
        return store.add_file(content, filename or "upload.jsonl", purpose)

    @router.get("/files")
    async def list_files():
        return {"object": "list", "data": store.list_files(), "has_more": False}

    @router.get("/files/{file_id}")
    async def get_file(file_id: str):
        return store.file(file_id)  # NotFound: a 404 (the app's handler)

    @router.get("/files/{file_id}/content")
    async def file_content(file_id: str):
        return FileResponse(store.content_path(file_id), media_type="application/octet-stream")

    @router.post("/batches")
    async def create_batch(request: HTTPRequest):
        body = await json_body(request)
        endpoint, window = body.get("endpoint"), body.get("completion_window", COMPLETION_WINDOW)
        if endpoint not in ENDPOINTS:
            raise APIError(400, f"'endpoint' must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", param="endpoint")
        if window != COMPLETION_WINDOW:
            raise APIError(400, f"'completion_window' must be {COMPLETION_WINDOW!r}, got {window!r}", param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            raise APIError(400, "'metadata' must be an object of strings", param="metadata")
        file_id = body.get("input_file_id")
        try:
            meta = store.file(file_id) if isinstance(file_id, str) else None
            if meta is None or meta["purpose"] != "batch":
                raise NotFound(f"No such File object: {file_id} (upload one with purpose 'batch')")
            lines = parse_lines(store.content_path(file_id).read_text(encoding="utf-8"), endpoint)
        except NotFound as e:
            raise APIError(404, str(e), param="input_file_id", code="not_found") from None
        except (BatchInputError, UnicodeDecodeError) as e:
            raise APIError(400, f"the input file is not a batch: {e}", param="input_file_id", code="invalid_file") from None
        if len(lines) > MAX_LINES:
            raise APIError(400, f"the input file has {len(lines)} requests; a batch holds at most {MAX_LINES}", param="input_file_id")
        batch = store.add_batch(file_id, endpoint, len(lines), metadata)
        worker.submit(batch["id"])
        return batch

    @router.get("/batches")
    async def list_batches(request: HTTPRequest):
        limit, after = request.query_params.get("limit", "20"), request.query_params.get("after")
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise APIError(400, f"'limit' must be an integer between 1 and 100, got {limit!r}", param="limit")
        limit = int(limit)
        batches = store.list_batches()
        if after is not None:
            ids = [b["id"] for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        page = batches[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(batches) > limit}  # fmt: skip

    @router.get("/batches/{batch_id}")
    async def get_batch(batch_id: str):
        return store.batch(batch_id)

    @router.post("/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        return worker.cancel(batch_id)

    return router
