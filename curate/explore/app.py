"""The explorer's web app: a Starlette app over a :class:`curate.explore.session.Session`,
serving the plain HTML/JS/CSS in ``static/`` (no front-end build step) and a JSON API.

Every API error is ``{"error": "error: ..."}`` with status 400 (input: the CLI's one-line
message) or 404 (no such result, sample or page); nothing is written to the catalog or the pool.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import tempfile
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from curate.errors import CurateError
from curate.explore.session import Session

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK = "127.0.0.1"


def _error(e: Exception, status: int = 400) -> JSONResponse:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return JSONResponse({"error": f"error: {text}"}, status_code=status)


def _int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise CurateError(f"{name}={raw!r}: expected a whole number") from None


def _api(fn):
    """An endpoint whose work runs in a worker thread; CurateError -> 400 JSON with one line."""
    async def endpoint(request: Request):
        try:
            return await fn(request)
        except CurateError as e:
            return _error(e, 404 if "no such result" in str(e) else 400)
        except json.JSONDecodeError as e:
            return _error(CurateError(f"request body is not JSON ({e})"))
    return endpoint


def create_app(session: Session) -> Starlette:
    """The app over ``session`` (which must have a scratch directory)."""
    s = session

    async def index(request):
        return FileResponse(STATIC / "index.html")

    async def info(request):
        return JSONResponse({"catalog": str(s.catalog), "pool_rows": s.pool_rows, "columns": s.columns,
                             "shards": s.reader.source if s.reader else None, "timesplit": s.has_timesplit,
                             "embeddings": s.has_npz, "views": s.views})

    async def filters(request):
        return JSONResponse(await run_in_threadpool(s.filters))

    async def filter_params(request):
        path = request.query_params.get("path", "")
        return JSONResponse(await run_in_threadpool(s.filter_params, path))

    async def body(request) -> dict:
        data = json.loads(await request.body() or b"{}")
        if not isinstance(data, dict):
            raise CurateError("request body must be a JSON object")
        return data

    async def run(request):
        source = await body(request)
        res = await run_in_threadpool(s.run, source)
        return JSONResponse(res.info)

    async def compare(request):
        data = await body(request)
        if not isinstance(data.get("a"), dict) or not isinstance(data.get("b"), dict):
            raise CurateError("compare needs two sources, a and b")
        return JSONResponse(await run_in_threadpool(s.compare, data["a"], data["b"]))

    async def page(request):
        q = request.query_params
        out = await run_in_threadpool(s.page, q.get("rid", ""), q.get("part", "kept"), _int(request, "offset", 0),
                                      _int(request, "limit", 60))
        return JSONResponse(out)

    async def image(request):
        thumb = _int(request, "thumb", 0)
        if not 0 <= thumb <= 2048:
            raise CurateError(f"thumb={thumb}: must be 0..2048")
        media, data = await run_in_threadpool(s.image, request.path_params["uid"], thumb or None)
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    async def sample(request):
        return JSONResponse(await run_in_threadpool(s.sample, request.path_params["uid"]))

    async def hist(request):
        rid, column = request.path_params["rid"], request.path_params["column"]
        if column.endswith(".png"):
            return Response(await run_in_threadpool(s.histogram_png, rid, column[:-4]), media_type="image/png")
        return JSONResponse(await run_in_threadpool(s.histogram, rid, column))

    async def keep_rate(request):
        rid = request.path_params["rid"]
        if rid.endswith(".png"):
            return Response(await run_in_threadpool(s.keep_rate_png, rid[:-4]), media_type="image/png")
        return JSONResponse(await run_in_threadpool(s.keep_rate, rid))

    async def export(request):
        rid, name = request.path_params["rid"], request.path_params["name"]
        part, _, ext = name.rpartition(".")
        label = s.result(rid).label.replace("/", "_").replace(" ", "_")
        if ext == "npy":
            path = await run_in_threadpool(s.export_subset, rid, part)
            return FileResponse(path, media_type="application/octet-stream", filename=f"{label}_{part}.npy")
        if ext == "csv":
            s.part(rid, part)  # unknown result or part: a 400/404 before the stream starts
            return StreamingResponse(s.export_csv(rid, part), media_type="text/csv",
                                     headers={"Content-Disposition": f'attachment; filename="{label}_{part}.csv"'})
        raise CurateError(f"{name}: export as PART.npy or PART.csv")

    routes = [
        Route("/", index),
        Route("/api/info", _api(info)),
        Route("/api/filters", _api(filters)),
        Route("/api/filter-params", _api(filter_params)),
        Route("/api/run", _api(run), methods=["POST"]),
        Route("/api/compare", _api(compare), methods=["POST"]),
        Route("/api/page", _api(page)),
        Route("/api/image/{uid}", _api(image)),
        Route("/api/sample/{uid}", _api(sample)),
        Route("/api/hist/{rid}/{column}", _api(hist)),
        Route("/api/keep-rate/{rid}", _api(keep_rate)),
        Route("/api/export/{rid}/{name}", _api(export)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) only accepts connections from this machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def serve(catalog=None, host: str = LOOPBACK, port: int = 8765, log_level: str = "warning") -> None:
    """Serve the explorer on ``host:port`` until interrupted (results live in a temporary
    directory removed on exit)."""
    import uvicorn  # lazy: the explore extra, only when serving

    with tempfile.TemporaryDirectory(prefix="curate-explore-") as work:
        session = Session(catalog, Path(work))
        try:
            uvicorn.run(create_app(session), host=host, port=port, log_level=log_level)
        finally:
            session.close()
