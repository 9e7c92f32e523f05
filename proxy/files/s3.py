"""`outputs.store: s3`: objects in an S3-compatible bucket (AWS S3, Cloudflare R2, MinIO, Ceph, GCS's
interoperability endpoint), spoken to with aiobotocore: botocore's signing and retries on aiohttp.

A file goes up in one PUT when it is smaller than a part, else as a multipart upload, so a copy holds
at most one part (8 MiB) in memory whatever the file's size. `/view` hands Range and the conditional
headers to GetObject and relays the store's answer (206, 304, 412, 416); S3 has no If-Range, so a Range
with If-Range is dropped and the whole file served, which RFC 9110 allows.

Credentials: the config's `access_key_id` / `secret_access_key` (usually `${ENV}` values) when set, else
botocore's standard chain (environment, shared files, container or instance roles).
"""

from __future__ import annotations

import email.utils
import hashlib
from collections.abc import AsyncIterable, Awaitable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web
from botocore.exceptions import BotoCoreError, ClientError

from proxy.files.base import CHUNK, FileStoreUnavailable, StoredFile, disposition

PART = 8 * 1024 * 1024   # S3's parts are at least 5 MiB (but the last)
DELETE_BATCH = 1000      # DeleteObjects takes at most this many keys
PRESIGN_MAX_S = 7 * 24 * 3600   # SigV4 presigned URLs live a week at most
T = TypeVar("T")
_CONDITIONS = (("If-None-Match", "IfNoneMatch"), ("If-Match", "IfMatch"),
               ("If-Modified-Since", "IfModifiedSince"), ("If-Unmodified-Since", "IfUnmodifiedSince"))
_RELAYED_REFUSALS = frozenset({304, 412, 416})
_FAILURES = (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError)


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False
    access_key_id: str | None = None
    secret_access_key: str | None = None
    create_bucket: bool = False
    timeout_s: float = 30.0
    public_endpoint_url: str | None = None   # the endpoint in presigned links, when clients reach it elsewhere


class S3Store:
    kind = "s3"

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._signer: Any = None   # signs links for `public_endpoint_url` (a signature covers the host)
        self._made = False         # the bucket is known to exist (create_bucket)

    async def start(self) -> None:
        s = self.settings
        # Checksums only where S3 requires them: botocore's newer default (CRC32 trailers on every upload)
        # is refused by GCS's interoperability API and older MinIO and Ceph.
        config = AioConfig(s3={"addressing_style": "path" if s.path_style else "auto"}, signature_version="s3v4",
                           request_checksum_calculation="when_required", response_checksum_validation="when_required",
                           retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=min(s.timeout_s, 5),
                           read_timeout=s.timeout_s, max_pool_connections=64)
        credentials = ({"aws_access_key_id": s.access_key_id, "aws_secret_access_key": s.secret_access_key}
                       if s.access_key_id else {})
        session = get_session()
        self._client = await self._stack.enter_async_context(session.create_client(
            "s3", endpoint_url=s.endpoint_url, region_name=s.region, config=config, **credentials))
        self._signer = self._client if not s.public_endpoint_url else await self._stack.enter_async_context(
            session.create_client("s3", endpoint_url=s.public_endpoint_url, region_name=s.region, config=config,
                                  **credentials))
        await self.check()

    async def close(self) -> None:
        await self._stack.aclose()

    async def _create_bucket(self) -> None:
        if await self._found(self._client.head_bucket(Bucket=self.bucket)) is not None:
            return
        where = ({"CreateBucketConfiguration": {"LocationConstraint": self.settings.region}}
                 if self.settings.region and self.settings.region != "us-east-1" else {})
        await self._call(self._client.create_bucket(Bucket=self.bucket, **where))

    async def put(self, key: str, chunks: AsyncIterable[bytes], content_type: str, *,
                  sha256: str | None = None) -> StoredFile:
        extra = {"ContentType": content_type, **({"Metadata": {"sha256": sha256}} if sha256 else {})}
        buf = bytearray()
        size = 0
        upload: _Multipart | None = None
        try:
            async for chunk in chunks:
                buf += chunk
                size += len(chunk)
                while len(buf) >= PART:   # parts of one size (R2 requires it), the last one shorter
                    upload = upload or await _Multipart.begin(self, key, extra)
                    await upload.add(bytes(buf[:PART]))
                    del buf[:PART]
            if upload is None:
                await self._call(self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(buf), **extra))
            else:
                if buf:
                    await upload.add(bytes(buf))
                await upload.complete()
        except BaseException:
            if upload is not None:
                await upload.abort()
            raise
        return StoredFile(key, size)

    async def serve(self, request: web.Request, key: str, headers: Mapping[str, str]) -> web.StreamResponse | None:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if "Range" in request.headers and "If-Range" not in request.headers:
            params["Range"] = request.headers["Range"]
        params |= {param: request.headers[name] for name, param in _CONDITIONS
                   if name in request.headers and (not name.endswith("Since") or _http_date(request.headers[name]))}
        try:
            obj = await self._client.get_object(**params)
        except ClientError as exc:
            status = _status(exc)
            if status == 404:
                return None
            if status in _RELAYED_REFUSALS:
                return web.Response(status=status, headers=_refusal_headers(exc))
            raise FileStoreUnavailable(_describe(exc)) from exc
        except _FAILURES as exc:
            raise FileStoreUnavailable(repr(exc)) from exc
        resp = web.StreamResponse(status=206 if obj.get("ContentRange") else 200, headers=headers)
        resp.content_length = obj["ContentLength"]
        resp.headers["Accept-Ranges"] = "bytes"
        resp.headers["ETag"] = obj["ETag"]
        if obj.get("ContentRange"):
            resp.headers["Content-Range"] = obj["ContentRange"]
        if obj.get("LastModified") is not None:
            resp.last_modified = obj["LastModified"]
        async with obj["Body"] as body:
            await resp.prepare(request)
            async for chunk in body.iter_chunks(CHUNK):
                await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def read(self, key: str, limit: int) -> bytes | None:
        obj = await self._found(self._client.get_object(Bucket=self.bucket, Key=key))
        if obj is None:
            return None
        async with obj["Body"] as body:
            if obj["ContentLength"] > limit:
                raise ValueError(f"{key}: {obj['ContentLength']} bytes is over {limit}")
            return bytes(await self._call(body.read()))

    async def delete(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": key} for key in keys[i:i + DELETE_BATCH]]
            answer = await self._call(self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))
            if answer.get("Errors"):
                raise FileStoreUnavailable(f"delete refused: {answer['Errors'][:3]}")

    async def keys(self, prefix: str) -> list[str]:
        return sorted(key for key, _ in await self.listing(prefix))

    async def listing(self, prefix: str) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        try:
            async for page in pages:
                out += [(item["Key"], item["LastModified"].timestamp()) for item in page.get("Contents", ())]
        except (ClientError, *_FAILURES) as exc:
            raise FileStoreUnavailable(repr(exc)) from exc
        return out

    async def digest(self, key: str) -> str | None:
        """From the object's `sha256` metadata (kept by `put`), else by reading it."""
        head = await self._found(self._client.head_object(Bucket=self.bucket, Key=key))
        if head is None:
            return None
        kept = head.get("Metadata", {}).get("sha256")
        if kept:
            return str(kept)
        data = await self.read(key, 1 << 30)
        return None if data is None else hashlib.sha256(data).hexdigest()

    async def link(self, key: str, ttl_s: int, filename: str) -> str | None:
        params = {"Bucket": self.bucket, "Key": key, "ResponseContentDisposition": disposition(filename)}
        return str(await self._call(self._signer.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=min(ttl_s, PRESIGN_MAX_S))))

    async def check(self) -> None:
        """With `create_bucket`, the bucket is made on the first check that reaches the store (at start, or
        at a later health check if the store was away then)."""
        if self.settings.create_bucket and not self._made:
            await self._create_bucket()
            self._made = True
        await self._call(self._client.head_bucket(Bucket=self.bucket))

    async def _found(self, call: Awaitable[T]) -> T | None:
        """`_call` for a request about one object: None when there is no such object."""
        try:
            return await self._call(call)
        except FileStoreUnavailable as exc:
            if isinstance(exc.__cause__, ClientError) and _status(exc.__cause__) == 404:
                return None
            raise

    async def _call(self, call: Awaitable[T]) -> T:
        """A request to the store; whatever way it fails, the store is unavailable for now."""
        try:
            return await call
        except ClientError as exc:
            raise FileStoreUnavailable(_describe(exc)) from exc
        except _FAILURES as exc:
            raise FileStoreUnavailable(repr(exc)) from exc


class _Multipart:
    """One multipart upload in progress: its parts' ETags, in order."""

    def __init__(self, store: S3Store, key: str, upload_id: str) -> None:
        self.store, self.key, self.upload_id = store, key, upload_id
        self.parts: list[dict[str, Any]] = []

    @classmethod
    async def begin(cls, store: S3Store, key: str, extra: dict[str, Any]) -> _Multipart:
        answer = await store._call(store._client.create_multipart_upload(Bucket=store.bucket, Key=key, **extra))
        return cls(store, key, answer["UploadId"])

    async def add(self, body: bytes) -> None:
        number = len(self.parts) + 1
        answer = await self.store._call(self.store._client.upload_part(
            Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=body))
        self.parts.append({"ETag": answer["ETag"], "PartNumber": number})

    async def complete(self) -> None:
        await self.store._call(self.store._client.complete_multipart_upload(
            Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts}))

    async def abort(self) -> None:
        """Best effort: a bucket lifecycle rule should end abandoned uploads anyway."""
        try:
            await self.store._client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key,
                                                            UploadId=self.upload_id)
        except (ClientError, *_FAILURES):
            pass


def _http_date(value: str) -> bool:
    """An HTTP date: one that is not is ignored (RFC 9110), not handed to botocore, which would refuse it."""
    try:
        return email.utils.parsedate_to_datetime(value) is not None
    except (TypeError, ValueError, IndexError):
        return False


def _status(exc: ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = exc.response.get("Error", {}).get("Code")
    if code in ("NoSuchKey", "NotFound", "404"):
        return 404
    return int(status) if status else None


def _refusal_headers(exc: ClientError) -> dict[str, str]:
    headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    return {name: headers[name.lower()] for name in ("ETag", "Content-Range", "Last-Modified")
            if name.lower() in headers}


def _describe(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return f"{error.get('Code', '?')}: {error.get('Message', '')}".strip()
