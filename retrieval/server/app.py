"""The HTTP API and the search page, over one opened `Index`.

    GET  /                    the search page (page.html)
    GET  /api/search          text and composed queries: q, add, subtract, like, unlike, top, candidates,
                              rerank, min_prob, under, keyword, after, before, sort, hybrid (`query`'s
                              flags; q may be left out where keyword or like is given)
    POST /api/search/image    the request body is an image (at most MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS);
                              the same parameters compose with it, the filters too
    GET  /api/similar         images like the indexed file `path`
    GET  /api/status          `blipsearch status --json` (503 where the index is damaged, as its exit status 1)
    GET  /api/thumbnail       a small JPEG of the indexed file `path`
    GET  /api/original        the indexed file `path` itself
    GET  /openapi.json        the OpenAPI schema (no /docs page: FastAPI's loads its script from a CDN, which
                              would then run on this origin, with access to the API and the images)

Results have `query --json`'s schema (caption and date included), plus each file's `size`, `modified`
date and `camera`. Every bad request is a
4xx with `{"error": "..."}`. Sync handlers run in Starlette's thread pool; the `Index` runs one query at a
time (one model), and each query first picks up a generation an indexing run has finished meanwhile.
"""

from __future__ import annotations

import hmac
import io
import logging
import mimetypes
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, unquote, unquote_to_bytes

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from blipsearch.indexer.images import check_header

from ..api import FieldError, Index, Indexed, NotIndexedError, Term, more_terms
from ..dates import date_range
from ..errors import BlipsearchError, ImageLoadError, InvalidInputError, ModelMismatchError, StoreError, printable
from ..search import SearchOptions
from .files import ServedFiles, UnservableError

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 32 << 20
MAX_UPLOAD_PIXELS = 50_000_000  # a 50-megapixel upload decodes to ~150 MB at most
MAX_TOP = 500
TOKEN_COOKIE = "blipsearch_token"

Texts = Annotated[list[str], Query()]
# bounds and choices shown in the OpenAPI document; checked by `_options` and SearchOptions, which name them
Count = Annotated[int, Query(json_schema_extra={"minimum": 1, "maximum": MAX_TOP})]
Sort = Annotated[str, Query(json_schema_extra={"enum": ["score", "date"]})]


class ErrorBody(BaseModel):
    error: str  # one line: what is wrong and what to do


# every error answer, as the schema shows it (FastAPI's own 422 body, {"detail": [...]}, is not what we send)
ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in (
    (400, "a bad value, named"), (401, "no valid access token (with --token)"), (403, "a request from another site"),
    (404, "not an indexed file"), (409, "an indexed file that changed since it was indexed, or an index rebuilt "
                                        "with another model"),
    (413, "an upload over the limits"), (422, "a malformed request"),
    (503, "the index cannot be read now: damaged, or a first run or rebuild under way"))}


class TooLarge(InvalidInputError):
    """An upload over the limits."""


def create_app(index: Index, cache: Path, token: str | None = None, hosts: Sequence[str] | None = None) -> FastAPI:
    """The server's app; `token`: every request must carry it (header, `?token=` or the page's cookie);
    `hosts`: the only names a request's Host header may give (against DNS rebinding of a loopback server)."""
    app = FastAPI(title="blipsearch", summary="Search your images with words (BLIP image-text retrieval)",
                  docs_url=None, redoc_url=None)
    files = ServedFiles(index, cache)
    _errors(app)
    _utf8_parameters(app)  # added first, so it runs after the token and host checks
    if token:
        _guard(app, token)
    if hosts:
        _hosts(app, hosts)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8"))

    @app.get("/api/search", summary="Images matching a text or a composed query", responses=ERRORS)
    def search(q: str | None = None, add: Texts = (), subtract: Texts = (), like: Texts = (), unlike: Texts = (),
               top: Count = 10, candidates: Count = 64, rerank: bool = True, min_prob: float | None = None,
               under: str | None = None, keyword: str | None = None, after: str | None = None,
               before: str | None = None, sort: Sort = "score", hybrid: bool | None = None) -> dict:
        more = _more(add, subtract, like, unlike)
        if q is not None and not q.strip():
            raise FieldError("q", "is empty: give a query text, or leave q out for like=PATH or keyword words")
        if q is None and not like and (keyword is None or more):
            raise FieldError("q", "is missing: give a query text, like=PATH (an indexed image), or keyword words "
                                  "alone")
        terms = [Term(text=q), *more] if q is not None else more if like else []
        options = _options(top, candidates, rerank, min_prob, under, keyword, after, before, sort, hybrid)
        label = q if q is not None else f"(like {', '.join(like)})" if like else keyword
        return _answer(index, label, terms, options)

    @app.post("/api/search/image", summary="Images like the uploaded image (the request body)", responses=ERRORS,
              openapi_extra={"requestBody": {"required": True, "description": "the image file itself",
                                             "content": {"image/*": {"schema": {"type": "string",
                                                                                "format": "binary"}}}}})
    async def search_image(request: Request, add: Texts = (), subtract: Texts = (), like: Texts = (),
                           unlike: Texts = (), top: Count = 10, candidates: Count = 64, rerank: bool = True,
                           min_prob: float | None = None, under: str | None = None, keyword: str | None = None,
                           after: str | None = None, before: str | None = None, sort: Sort = "score",
                           hybrid: bool | None = None) -> JSONResponse:
        data = await _upload(request)
        terms = [Term(image=data), *_more(add, subtract, like, unlike)]
        options = _options(top, candidates, rerank, min_prob, under, keyword, after, before, sort, hybrid)
        return JSONResponse(await run_in_threadpool(_answer, index, "(uploaded image)", terms, options))

    @app.get("/api/similar", summary="Images like an indexed image", responses=ERRORS)
    def similar(path: str, top: Count = 10, under: str | None = None) -> dict:
        return _answer(index, path, [Term(image=Indexed(path))], _options(top, 64, False, None, under))

    @app.get("/api/status", summary="The index: model, counts, size, last update (503 where it is damaged)",
             responses={**ERRORS, 503: {"description": "the index is damaged (the status object: its `damaged` "
                                                       "says why), or cannot be read now ({\"error\": ...})"}})
    def status() -> JSONResponse:
        index.refresh()
        report = index.status()
        return JSONResponse(report, status_code=503 if report["damaged"] else 200)  # a health check fails

    @app.get("/api/thumbnail", summary="A small JPEG of an indexed image", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}, "description": "the JPEG"}, **ERRORS})
    def thumbnail(path: str, request: Request) -> Response:
        index.refresh()
        made = files.thumbnail(path)
        headers = {"Cache-Control": "private, max-age=3600"}
        if isinstance(made, bytes):  # the thumbnail cache cannot be written: made for this request
            return Response(made, media_type="image/jpeg", headers=headers)
        headers["ETag"] = f'"{made.stem}"'  # the content hash it was made from
        if request.headers.get("if-none-match") == headers["ETag"]:
            return Response(status_code=304, headers=headers)
        # a few KB, whole: FileResponse answered a bad Range header in plain text, not {"error": ...}
        return Response(made.read_bytes(), media_type="image/jpeg", headers=headers)

    @app.get("/api/original", summary="An indexed image file itself", response_class=Response,
             responses={200: {"content": {"image/*": {}}, "description": "the file's bytes"}, **ERRORS})
    def original(path: str) -> StreamingResponse:
        index.refresh()
        file = files.open(path)
        kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return StreamingResponse(_chunks(file), media_type=kind, headers={"X-Content-Type-Options": "nosniff"})

    app.add_middleware(_HeadAsGet)  # the last added runs first: the token and host checks see the GET
    return app


HEAD_PATHS = frozenset({"/", "/api/status", "/api/thumbnail", "/api/original"})


class _HeadAsGet:
    """`HEAD` (health checks, `curl -I`) answers as `GET` does on the page, status and file routes; the server
    (uvicorn) sends the headers alone, as it reads the method from its own copy of the request. A search is
    not a resource to probe: `HEAD` there stays 405."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD" and scope["path"] in HEAD_PATHS:
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


def _more(add, subtract, like, unlike) -> list[Term]:
    """Added and subtracted terms; image terms name indexed files, by their stored vectors (no file is read:
    any other path is `NotIndexedError`). A bad one is refused naming its parameter."""
    try:
        return more_terms(add, subtract, like, unlike, indexed=True)
    except FieldError as exc:
        name = {"add_images": "like", "subtract_images": "unlike"}.get(exc.field, exc.field)
        raise FieldError(name, exc.problem) from exc


def _options(top: int, candidates: int, rerank: bool, min_prob: float | None, under: str | None,
             keyword: str | None = None, after: str | None = None, before: str | None = None, sort: str = "score",
             hybrid: bool | None = None) -> SearchOptions:
    for name, value in (("top", top), ("candidates", candidates)):
        if not 1 <= value <= MAX_TOP:  # a bound of the server's; the rest is SearchOptions' to check
            raise FieldError(name, f"must lie between 1 and {MAX_TOP}")
    start, end = date_range(after, before)
    return SearchOptions(top=top, candidates=candidates, rerank=rerank, min_prob=min_prob,
                         under=_under(under) if under is not None else None, keyword=keyword, after=start,
                         before=end, sort=sort, hybrid=hybrid)


def _under(folder: str) -> list[str]:
    """`under` as a prefix of the indexed paths, written as results show them. The server reads no folder for
    it, and expands no `~`: an answer would tell a client which folders exist on this machine (`under=""`
    once searched everything)."""
    if not folder.strip() or "\0" in folder:
        raise FieldError("under", "must name a folder: an absolute path as the results show it")
    if folder.startswith("s3://"):
        return [folder.rstrip("/")]
    if not os.path.isabs(folder):
        raise FieldError("under", f"{printable(folder)} is not an absolute path: give a folder as the results show it")
    return [os.path.normpath(folder)]


def _answer(index: Index, query: str, terms: list[Term], options: SearchOptions) -> dict:

    results = index.search(terms, options)  # on the latest finished generation (it refreshes)
    return {"query": printable(query), "model": printable(index.model_id),
            "results": [r.to_json(details=True) for r in results]}


async def _upload(request: Request) -> bytes:
    """The body, refused past MAX_UPLOAD_BYTES (before reading it where the length is declared)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
        raise TooLarge(f"the upload is {int(declared)} bytes; the limit is {MAX_UPLOAD_BYTES}")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_UPLOAD_BYTES:
            raise TooLarge(f"the upload is over {MAX_UPLOAD_BYTES} bytes, the limit")
    if not data:
        raise FieldError("image", "is missing: send the image file as the request body")
    try:
        check_header(io.BytesIO(data), "the uploaded image", MAX_UPLOAD_PIXELS)
    except ImageLoadError as exc:
        if "decompression bomb" in str(exc):
            raise TooLarge(f"the uploaded image: {exc}") from exc
        raise FieldError("image", f"cannot be read: {exc}") from exc
    return bytes(data)


def _chunks(file, size: int = 1 << 20):
    with file:
        while chunk := file.read(size):
            yield chunk


STATUS = ((TooLarge, 413), (NotIndexedError, 404), (UnservableError, 409), (ModelMismatchError, 409),
          (StoreError, 503), (BlipsearchError, 400))


def _errors(app: FastAPI) -> None:
    """Each library error becomes a 4xx (or 503: the index is unreadable now) with `{"error": message}`."""

    @app.exception_handler(BlipsearchError)
    def library_error(request: Request, exc: BlipsearchError) -> JSONResponse:
        code = next(code for kind, code in STATUS if isinstance(exc, kind))
        return JSONResponse({"error": str(exc)}, status_code=code)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # unknown route, wrong method
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # a defect: Starlette re-raises it after this answer, and the server (uvicorn) logs its traceback
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server's log has the details"},
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": problems}, status_code=422)


def _utf8_parameters(app: FastAPI) -> None:
    """A parameter whose percent-encoded bytes are not UTF-8 is refused, naming it: Starlette decodes them with
    replacement characters, and `q=%FF%FE` was searched as "\ufffd\ufffd" (the CLI and the library refuse
    such a query)."""

    @app.middleware("http")
    async def check_parameters(request: Request, call_next) -> Response:
        for pair in request.scope.get("query_string", b"").split(b"&"):
            name, _, value = pair.partition(b"=")
            try:
                unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8")
                unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError:
                shown = unquote_to_bytes(name).decode("utf-8", "backslashreplace")
                return JSONResponse({"error": f"{shown} is not valid UTF-8: percent-encode the text's UTF-8 bytes"},
                                    status_code=400)
        return await call_next(request)


def _hosts(app: FastAPI, hosts: Sequence[str]) -> None:
    """A loopback server without a token answers only itself and the user's own browser tab:
    - a web page whose name an attacker points at 127.0.0.1 sends its own name as Host (DNS rebinding);
    - another site's page that loads our URLs (`<img src>`, a form post) is marked by the browser as
      `Sec-Fetch-Site: cross-site`, or names its own `Origin`."""
    allowed = {h.lower() for h in hosts}

    @app.middleware("http")
    async def check_host(request: Request, call_next) -> Response:
        if _name(request.headers.get("host", "")) not in allowed:
            return JSONResponse({"error": f"requests must address this server as one of {sorted(allowed)}"},
                                status_code=400)
        origin = request.headers.get("origin")
        if request.headers.get("sec-fetch-site") == "cross-site" or (
                origin is not None and _name(origin.split("://", 1)[-1]) not in allowed):
            return JSONResponse({"error": "requests from other sites are refused"}, status_code=403)
        return await call_next(request)


def _name(host: str) -> str:
    """`host[:port]` -> host, lower-cased; `[::1]:8765` -> `[::1]`."""
    host = host.lower()
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _guard(app: FastAPI, token: str) -> None:
    """Refuse any request without the token; a page opened with `?token=` keeps it in a cookie."""

    @app.middleware("http")
    async def check_token(request: Request, call_next) -> Response:
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")  # the scheme's case does not matter (RFC 9110)
        # a header's bytes come decoded as latin-1: encoded back, a UTF-8 token matches its own bytes
        given = (credentials.encode("latin-1") if scheme.lower() == "bearer" and credentials else None) \
            or (request.query_params.get("token") or unquote(request.cookies.get(TOKEN_COOKIE, ""))).encode()
        if not hmac.compare_digest(given, token.encode()):
            return JSONResponse({"error": "a valid access token is required (Authorization: Bearer TOKEN)"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        response = await call_next(request)
        if request.query_params.get("token"):
            # percent-encoded: a cookie's value is Latin-1 at most (a token in Cyrillic or with "€" was a 500)
            response.set_cookie(TOKEN_COOKIE, quote(token, safe=""), httponly=True, samesite="strict")
        return response
