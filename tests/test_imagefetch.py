"""Image inputs given as a URL (proxy.imagefetch), against a real HTTP server on loopback: an image is kept
once as the tenant's upload under a name made from its bytes, whether fetched or sent as a `data:` URL; every
way a URL can fail to give an image (a refused address on any hop, a status, a type, a size, a timeout, too
many redirects, a malformed `data:` URL) is a 400 in ComfyUI's shape that says why."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

from proxy.errors import BadRequest
from proxy.imagefetch import FetchLimits, ImageFetcher, is_url
from proxy.uploads import UploadStore
from proxy.urlguard import AddressPolicy, UrlGuard, parse_networks
from tests.conftest import free_port
from tests.webhooks import serve

LOOPBACK_ONLY = AddressPolicy(allow=parse_networks(["127.0.0.1/32"]))
SMALL = 64 * 1024     # max_bytes in these tests: oversize bodies stay quick
NAME = re.compile(r"url-[0-9a-f]{16}\.(png|jpg)")


def image(fmt: str = "PNG", seed: int = 1) -> bytes:
    picture = Image.frombytes("RGB", (8, 8), bytes((seed + i) % 256 for i in range(8 * 8 * 3)))
    out = io.BytesIO()
    picture.save(out, format=fmt)
    return out.getvalue()


PNG = image()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@dataclass
class ImageServer:
    """An HTTP server on `host` answering by path; `hits` lists the paths asked for, in order."""

    host: str = "127.0.0.1"
    port: int = 0
    hits: list[str] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)   # lets /slow answer (at stop)
    stream_ended: asyncio.Event = field(default_factory=asyncio.Event)
    streamed: int = 0   # bytes /big-chunked wrote before its client went away
    _runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    async def start(self) -> ImageServer:
        app = web.Application(middlewares=[self._count])
        for path in FIXED:
            app.router.add_get(path, self._fixed)
        app.router.add_get("/big-chunked", self._chunked)
        app.router.add_get("/hop/{n}", self._hop)
        app.router.add_get("/to/{host}", self._to_host)
        app.router.add_get("/slow", self._slow)
        self._runner, self.port = await serve(app, self.host, self.port)
        return self

    async def stop(self) -> None:
        self.released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _count(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        self.hits.append(request.path)
        return await handler(request)

    async def _fixed(self, request: web.Request) -> web.Response:
        return FIXED[request.path]()

    async def _to_host(self, request: web.Request) -> web.Response:
        """A redirect to the same port on another host (one this test may not call)."""
        return _redirect(f"http://{request.match_info['host']}:{self.port}/png")

    async def _hop(self, request: web.Request) -> web.Response:
        """/hop/n redirects n times before the PNG: relative Locations, then an absolute-path one."""
        n = int(request.match_info["n"])
        return _redirect(str(n - 1) if n > 1 else "/png")

    async def _chunked(self, request: web.Request) -> web.StreamResponse:
        """A PNG that goes on far past the cap, with no Content-Length."""
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            await resp.write(PNG)
            for _ in range(1024):   # 64 MiB: more than any socket buffers hold for a client that stopped
                await resp.write(bytes(SMALL))
                self.streamed += SMALL
        except ConnectionError:
            pass
        finally:
            self.stream_ended.set()
        return resp

    async def _slow(self, request: web.Request) -> web.Response:
        await self.released.wait()
        return web.Response(body=PNG, content_type="image/png")


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location})


FIXED: dict[str, Callable[[], web.Response]] = {   # path: its answer, the same every time
    "/png": lambda: web.Response(body=PNG, content_type="image/png"),
    "/untyped": lambda: web.Response(body=PNG),   # application/octet-stream
    "/mislabelled": lambda: web.Response(body=image("JPEG"), content_type="image/png"),
    "/fake-png": lambda: web.Response(text="<html></html>", content_type="image/png"),
    "/page": lambda: web.Response(text="<html></html>", content_type="text/html"),
    "/big": lambda: web.Response(body=PNG + bytes(SMALL), content_type="image/png"),   # with Content-Length
    "/to/private": lambda: _redirect("http://10.0.0.1/png"),
    "/to/metadata": lambda: _redirect("http://169.254.169.254/latest/meta-data/"),
}


@pytest.fixture
async def server() -> AsyncIterator[ImageServer]:
    started = await ImageServer().start()
    yield started
    await started.stop()


Make = Callable[..., Awaitable[ImageFetcher]]


@pytest.fixture
async def fetchers(tmp_path: Path) -> AsyncIterator[Make]:
    """Fetchers over one folder store, loopback (127.0.0.1 only) allowed unless a test gives a policy."""
    made: list[tuple[ImageFetcher, UrlGuard]] = []
    uploads = UploadStore.in_folder(tmp_path)

    async def make(policy: AddressPolicy = LOOPBACK_ONLY, timeout_s: float = 10.0) -> ImageFetcher:
        guard = UrlGuard(policy)
        fetcher = ImageFetcher(guard, uploads, FetchLimits(max_bytes=SMALL, timeout_s=timeout_s))
        await fetcher.start()
        made.append((fetcher, guard))
        return fetcher

    yield make
    for fetcher, guard in made:
        await fetcher.close()
        await guard.close()


async def refusal(fetcher: ImageFetcher, url: str, tenant: str = "alice") -> str:
    """The details of the BadRequest fetching `url` raises, after checking its shape."""
    with pytest.raises(BadRequest) as caught:
        await fetcher.fetch(tenant, url)
    exc = caught.value
    assert (exc.status, exc.type, exc.message) == (400, "invalid_prompt", "Invalid image input")
    return exc.details


async def test_an_image_fetched_twice_is_one_upload_named_after_its_bytes(server, fetchers) -> None:
    fetcher = await fetchers()
    first = await fetcher.fetch("alice", server.url("/png"))
    assert NAME.fullmatch(first) and first.endswith(".png"), first
    assert await fetcher.fetch("alice", server.url("/png")) == first
    assert await fetcher.fetch("alice", server.url("/untyped")) == first   # no type given: the bytes decide
    folder = fetcher.uploads.folder("alice", "input")
    assert [p.name for p in folder.iterdir()] == [first]
    assert (folder / first).read_bytes() == PNG
    # the value names the tenant's upload as the upload copier looks it up, and only the tenant's
    assert await fetcher.uploads.locate_annotated("alice", first) is not None
    assert await fetcher.uploads.locate_annotated("alice", f"{first} [input]") is not None
    assert await fetcher.uploads.locate_annotated("bob", first) is None


async def test_a_data_url_of_the_same_image_is_the_same_upload(server, fetchers) -> None:
    fetcher = await fetchers()
    fetched = await fetcher.fetch("alice", server.url("/png"))
    assert await fetcher.fetch("alice", data_url(PNG)) == fetched
    assert await fetcher.fetch("alice", "DATA:Image/PNG;Base64," + base64.b64encode(PNG).decode()) == fetched
    assert len(list(fetcher.uploads.folder("alice", "input").iterdir())) == 1


async def test_the_extension_comes_from_the_bytes_not_the_header(server, fetchers) -> None:
    fetcher = await fetchers()
    name = await fetcher.fetch("alice", server.url("/mislabelled"))
    assert NAME.fullmatch(name) and name.endswith(".jpg"), name


async def test_three_redirects_are_followed_and_a_fourth_is_refused(server, fetchers) -> None:
    fetcher = await fetchers()
    assert NAME.fullmatch(await fetcher.fetch("alice", server.url("/hop/3")))
    assert server.hits == ["/hop/3", "/hop/2", "/hop/1", "/png"]
    server.hits.clear()
    assert "more than 3 redirects" in await refusal(fetcher, server.url("/hop/10"))
    assert server.hits == ["/hop/10", "/hop/9", "/hop/8", "/hop/7"]   # the fourth Location is not called


REFUSED = {
    "/page": "text/html, not an image",
    "/fake-png": "not an image",
    "/big": f"larger than 65536 bytes (Content-Length: {len(PNG) + SMALL})",   # refused before reading
    "/big-chunked": "larger than 65536 bytes",
    "/missing": "HTTP 404",
    "/to/private": "redirected to http://10.0.0.1/png: the URL points at a private address (10.0.0.1)",
    "/to/metadata": "a link-local (or metadata) address (169.254.169.254)",
    "/slow": "timed out",
}


@pytest.mark.parametrize("path", REFUSED)
async def test_a_url_that_gives_no_acceptable_image_is_refused_with_the_reason(server, fetchers, path) -> None:
    fetcher = await fetchers(timeout_s=0.5)
    details = await refusal(fetcher, server.url(path))
    assert REFUSED[path] in details
    assert not fetcher.uploads.folder("alice", "input").exists()


async def test_a_chunked_body_is_read_no_further_than_the_cap(server, fetchers) -> None:
    fetcher = await fetchers()
    assert "larger than" in await refusal(fetcher, server.url("/big-chunked"))
    await asyncio.wait_for(server.stream_ended.wait(), 10)   # the server's writes fail once the client left
    assert server.streamed < 1024 * SMALL


async def test_a_redirect_to_a_refused_address_is_not_connected_to(server, fetchers) -> None:
    inside = await ImageServer(host="127.0.0.2", port=server.port).start()   # same port, an address not allowed
    try:
        fetcher = await fetchers()
        details = await refusal(fetcher, server.url("/to/127.0.0.2"))
        assert "a loopback address (127.0.0.2)" in details
        assert inside.hits == []
        assert await fetcher.fetch("alice", inside.url("/png").replace("127.0.0.2", "127.0.0.1"))
    finally:
        await inside.stop()


async def test_the_default_policy_refuses_loopback_by_address_and_by_name(server, fetchers) -> None:
    fetcher = await fetchers(AddressPolicy())
    assert "a loopback address (127.0.0.1)" in await refusal(fetcher, server.url("/png"))
    details = await refusal(fetcher, f"http://localhost:{server.port}/png")
    assert "localhost resolves to a loopback address" in details   # the guarded resolver, at connect
    assert server.hits == []


async def test_a_url_that_cannot_be_called_is_refused(fetchers) -> None:
    fetcher = await fetchers(AddressPolicy())
    assert "only http and https" in await refusal(fetcher, "file:///etc/passwd")
    assert "credentials" in await refusal(fetcher, "http://user:pw@example.com/a.png")
    assert "could not be fetched" in await refusal(
        await fetchers(), f"http://127.0.0.1:{free_port()}/png")   # allowed, but nothing listens there


DATA_REFUSED = {
    "data:image/png;base64": "needs a comma",
    "data:text/plain;base64,aGVsbG8=": "text/plain is not an image",
    "data:,aGVsbG8=": "text/plain is not an image",
    "data:image/png," + PNG[:8].hex(): "must be base64",
    "data:image/png;base64,@@not base64@@": "malformed",
    "data:image/png;base64,iVBORw0KGgo": "malformed",   # a truncated quantum
    data_url(b"hello, not an image"): "not an image",
    data_url(PNG + bytes(SMALL)): "larger than 65536 bytes",
    data_url(PNG + bytes(SMALL - len(PNG) + 1)): "larger than 65536 bytes",   # one byte over, once decoded
}


@pytest.mark.parametrize("url", DATA_REFUSED, ids=range(len(DATA_REFUSED)))
async def test_a_data_url_that_is_not_a_base64_image_is_refused(fetchers, url) -> None:
    fetcher = await fetchers()
    assert DATA_REFUSED[url] in await refusal(fetcher, url)


async def test_a_data_url_at_the_cap_is_taken(fetchers) -> None:
    fetcher = await fetchers()
    assert NAME.fullmatch(await fetcher.fetch("alice", data_url(PNG + bytes(SMALL - len(PNG)))))


@pytest.mark.parametrize(("value", "expected"), [
    ("http://example.com/a.png", True), ("HTTPS://example.com/a.png", True), ("data:image/png;base64,", True),
    ("Data:image/png;base64,", True), ("photo.png", False), ("sub/http.png", False), ("ftp://example.com/a", False),
    ("https:/example.com", False), ("", False),
])
def test_is_url_tells_urls_from_file_names(value: str, expected: bool) -> None:
    assert is_url(value) is expected
