"""The viewer's web server (tornado): routes, request checks, one-line errors.

Every answer is computed on a small thread pool (the event loop only routes and sends), from
`ViewerData`; each failure is one JSON line `{"error": ...}` with a status (404 for what the
viewer was not given, 400 for a bad parameter, 500 for a cache or checkpoint that cannot be
read) and one line in the log, so the page shows it and the server goes on.

Requests are checked before anything is done: the Host header must name this machine when the
server listens on a loopback address (a web page elsewhere cannot reach it through a DNS name
that resolves to 127.0.0.1), an upload must come from the viewer's own page (Origin), and
static files are tornado's StaticFileHandler under the package's static/ folder, which refuses
any path that resolves outside it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import socket
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tornado.httpserver
import tornado.netutil
import tornado.web

from dhf_cache.cache.storage import storage_exceptions
from dhf_cache.errors import DhfCacheError, UsageError, first_line
from dhf_cache.viewer.data import ViewerData
from dhf_cache.viewer.descriptors import UnknownItem

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"),
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name of a Host header without its port ("[::1]:8765" -> "::1")."""
    return (urlsplit("//" + header).hostname or "").lower()


def failure(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, one line) for an exception raised while answering."""
    if isinstance(exc, UnknownItem):
        return 404, str(exc).splitlines()[0]
    if isinstance(exc, UsageError):
        return 400, str(exc).splitlines()[0]
    if isinstance(exc, DhfCacheError):
        return 500, str(exc).splitlines()[0]
    if isinstance(exc, storage_exceptions()):
        return 500, (f"storage or I/O failure ({type(exc).__name__}: {first_line(exc)}); check the cache's path "
                     "or server, then reload")
    return 500, f"internal error ({type(exc).__name__}: {first_line(exc)}); the viewer's log has the details"


class Handler(tornado.web.RequestHandler):
    """Checks the Host header, answers errors as one JSON line, computes on the pool."""

    def initialize(self, data: ViewerData, pool: ThreadPoolExecutor, log: Callable[[str], None],
                   hosts: frozenset[str] | None) -> None:
        """`hosts`: the Host names answered (None: any, when listening beyond loopback)."""
        self.data, self.pool, self.log, self.hosts = data, pool, log, hosts

    def set_default_headers(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.set_header(name, value)
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        if self.hosts is not None and host_name(self.request.host) not in self.hosts:
            self.fail(403, f"Host {self.request.host!r} refused: the viewer answers requests for this machine only "
                           "(start it with --host to listen elsewhere)")

    def fail(self, status: int, message: str) -> None:
        self.log(f"{self.request.method} {self.request.uri}: {status} {message}")
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": message}))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """tornado's own refusals (a static path outside static/, a method not allowed), as one
        JSON line that names no file of the server."""
        message = {400: "malformed request (e.g. an upload form that cannot be read); reload the page and retry",
                   403: "forbidden: the viewer serves its own page and what it was given, nothing else",
                   404: f"{self.request.path[:200]!r}: not found"}.get(status_code, f"{status_code} {self._reason}")
        self.log(f"{self.request.method} {self.request.uri[:200]}: {status_code} {message}")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": message}))

    async def answer(self, compute: Callable[[], Any], content_type: str | None = None) -> None:
        """Run compute() on the pool and send its JSON (or bytes of `content_type`)."""
        try:
            value = await asyncio.get_running_loop().run_in_executor(self.pool, compute)
        except Exception as exc:  # noqa: BLE001 - every failure is one line on the page and in the log
            status, message = failure(exc)
            if status == 500 and not isinstance(exc, (DhfCacheError, *storage_exceptions())):
                self.log("".join(traceback.format_exception(exc)).rstrip())
            self.fail(status, message)
            return
        if content_type is None:
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps(value, allow_nan=False, default=_json_default))
        else:
            self.set_header("Content-Type", content_type)
            self.finish(value)

    # parameters, read on the pool inside `answer`: a bad one is a UsageError line like any other
    def integer(self, name: str) -> int:
        text = self.get_query_argument(name, None)
        try:
            return int(text)
        except (TypeError, ValueError):
            raise UsageError(f"parameter {name}={text!r}: expected an integer") from None

    def number(self, name: str) -> float:
        text = self.get_query_argument(name, None)
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise UsageError(f"parameter {name}={text!r}: expected a finite number")
        return value

    def text(self, name: str) -> str:
        value = self.get_query_argument(name, None)
        if not value:
            raise UsageError(f"parameter {name}: missing")
        return value


def _json_default(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


class PageHandler(Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish((STATIC / "index.html").read_bytes())


class StaticHandler(Handler, tornado.web.StaticFileHandler):
    """The page's scripts and styles; the path check is StaticFileHandler's (validate_absolute_path)."""

    def initialize(self, path: str, **kwargs: Any) -> None:  # noqa: D401
        Handler.initialize(self, **kwargs)
        tornado.web.StaticFileHandler.initialize(self, path)

    def set_default_headers(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.set_header(name, value)
        self.set_header("Cache-Control", "no-cache")


class InfoHandler(Handler):
    async def get(self) -> None:
        await self.answer(self.data.info)


class ImagesHandler(Handler):
    async def get(self) -> None:
        await self.answer(lambda: {"images": self.data.image_list()})


class PairsHandler(Handler):
    async def get(self) -> None:
        await self.answer(lambda: {"eval": self.integer("eval"), "pairs": self.data.pair_rows(self.integer("eval"))})


class PairHandler(Handler):
    async def get(self) -> None:
        await self.answer(lambda: self.data.pair_detail(self.integer("eval"), self.integer("pair")))


class PhotoHandler(Handler):
    async def get(self) -> None:
        await self.answer(lambda: self.data.photo(self.text("id")), "image/jpeg")


class ClickHandler(Handler):
    async def get(self) -> None:
        await self.answer(lambda: self.data.click(self.integer("eval"), self.integer("pair"), self.text("desc"),
                                                  (self.number("x"), self.number("y")), self.integer("load")))


class PcaHandler(Handler):
    async def get(self) -> None:
        await self.answer(lambda: self.data.pca(self.text("desc"), self.text("id")))


class MixingHandler(Handler):
    async def get(self) -> None:
        await self.answer(lambda: self.data.mixing(self.text("checkpoint")))


class UploadHandler(Handler):
    def post(self) -> None:
        origin = self.request.headers.get("Origin")
        if origin and host_name(urlsplit(origin).netloc) != host_name(self.request.host):
            self.fail(403, f"upload from {origin!r} refused: upload from the viewer's own page")
            return
        files = self.request.files
        photos = []
        for field in ("a", "b"):
            uploaded = files.get(field) or []
            if len(uploaded) != 1:
                self.fail(400, f"photo {field.upper()}: expected one file in field {field!r}")
                return
            photos.append((uploaded[0].filename[:200], uploaded[0].body))
        try:
            checkpoint = int(self.get_body_argument("checkpoint", "0"))
            grid = int(self.get_body_argument("grid", "5"))
            job = self.data.uploads.submit(checkpoint, photos[0], photos[1], grid)
        except ValueError:
            self.fail(400, "checkpoint and grid: expected integers")
            return
        except DhfCacheError as exc:
            self.fail(*failure(exc))
            return
        self.finish(job.status())


class JobHandler(Handler):
    async def get(self) -> None:
        await self.answer(lambda: self.data.uploads.job(self.text("id")).status())


class UploadClickHandler(Handler):
    async def get(self) -> None:
        await self.answer(lambda: self.data.upload_click(self.text("job"), (self.number("x"), self.number("y")),
                                                         self.integer("load")))


class MissingHandler(Handler):
    """Any other path: one 404 line, whatever the method."""

    def missing(self, *args: Any) -> None:
        self.fail(404, f"{self.request.path[:200]!r}: no such page or endpoint")

    get = post = put = delete = patch = head = options = missing


ROUTES = [
    (r"/", PageHandler), (r"/api/info", InfoHandler), (r"/api/images", ImagesHandler),
    (r"/api/pairs", PairsHandler), (r"/api/pair", PairHandler), (r"/api/photo", PhotoHandler),
    (r"/api/click", ClickHandler), (r"/api/pca", PcaHandler), (r"/api/mixing", MixingHandler),
    (r"/api/upload", UploadHandler), (r"/api/job", JobHandler), (r"/api/upload-click", UploadClickHandler),
]


class ViewerServer:
    """The viewer on host:port, its event loop in a thread of its own (`start`, `stop`)."""

    def __init__(self, data: ViewerData, host: str = "127.0.0.1", port: int = 8765,
                 log: Callable[[str], None] = print, workers: int = 2):
        self.data = data
        self.host = host
        self.log = log
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="dhf-view")
        try:
            self.sockets = tornado.netutil.bind_sockets(port, host, family=socket.AF_UNSPEC)
        except OSError as exc:
            self.pool.shutdown()
            raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); choose "
                             "another --port (0 takes a free one)") from None
        self.port = self.sockets[0].getsockname()[1]
        hosts = frozenset({*LOOPBACK_NAMES, host_name(host if ":" not in host else f"[{host.strip('[]')}]")})
        common = {"data": data, "pool": self.pool, "log": log, "hosts": hosts if is_loopback(host) else None}
        routes = [(pattern, handler, common) for pattern, handler in ROUTES]
        routes.append((r"/static/(.*)", StaticHandler, {"path": str(STATIC), **common}))
        self.app = tornado.web.Application(routes, default_handler_class=MissingHandler, default_handler_args=common,
                                           compress_response=False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        for name in ("tornado.access", "tornado.application", "tornado.general"):
            logging.getLogger(name).setLevel(logging.ERROR)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else ("[::1]" if self.host == "::" else self.host)
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"http://{host}:{self.port}/"

    def start(self) -> str:
        """Serve from a background thread; returns the address."""
        self._thread = threading.Thread(target=self._serve, name="dhf-view-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        return self.url

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        # uploads: two photos of at most max_upload_bytes each, plus the form's few fields
        server = tornado.httpserver.HTTPServer(self.app, max_body_size=2 * self.data.uploads.max_bytes + (1 << 20))
        server.add_sockets(self.sockets)
        self._loop.call_soon(self._ready.set)
        try:
            self._loop.run_forever()
        finally:
            server.stop()
            self._loop.run_until_complete(server.close_all_connections())
            self._loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.data.close()

    def wait(self) -> None:
        """Block until Ctrl-C (or stop() from another thread)."""
        if self._thread is not None:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)
