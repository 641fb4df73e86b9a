"""``iterwego serve``: a local web page for ordering one album with a trained run.

The server is the Python standard library only (:class:`http.server.ThreadingHTTPServer`);
the page (``iterwego/web/``) is plain HTML, CSS and JavaScript served by it and
loads nothing from anywhere else (a Content-Security-Policy enforces that).

The run is loaded once at start-up. Each ``POST /api/order`` writes the
uploaded images into its own temporary directory, calls
:func:`iterwego.apps.order.order_stories` exactly as ``iterwego order`` does,
deletes the directory and answers with the same result dictionary that
``iterwego order --json`` writes, so the page and the CLI cannot disagree.

HTTP API (all bodies JSON)::

    GET  /api/info   -> {"run", "modalities", "aligner", "chosen_rounds", "fusion", "capture_time" (the default mode),
                         "limits": {...}, "version"}
    POST /api/order  <- {"images": [{"name": "a.jpg", "data": "<base64 or data: URI>"}, ...],
                         "sentences": ["...", ...], "decoder": "exact",
                         "capture_time": "auto"}      (either list may be empty; capture_time auto|on|off)
                     -> {"result": <iterwego order --json schema>, "thumbnails": [...],
                         "notes": [...], "elapsed_s": float}
    errors           -> {"error": "one line"} with 400 (bad input), 404, 411, 413 (too large), 415

``result["images"]`` holds the uploaded file names (the temporary paths are
gone by the time the answer is sent). ``thumbnails`` lists one entry per image
in ``result["image_order"]`` order: ``{"index", "name", "src"}`` with ``src`` a
``data:image/jpeg;base64,...`` URI (PNG for pictures of at most 96 pixels).
The uploads are written byte for byte, so their EXIF capture times reach
``order_stories``; ``result["capture_time"]`` says which photos they placed.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import re
import socket
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable, TextIO

from .. import __version__
from ..capture_time import MODES as CAPTURE_MODES
from ..decode import MAX_EXACT  # above this many items ``order_stories`` switches the exact decoder to beam search
from ..errors import ImageError, IterWeGOError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
#: Largest request body accepted (bytes); base64 makes images about 4/3 of their file size.
MAX_BODY_BYTES = 50 * 1024 * 1024
#: Most images and most sentences one request may carry. The orderers themselves have no
#: hard limit, but the page is for one album and larger requests only tie up the server.
MAX_ITEMS = 64
THUMB_PX = 192
SMALL_PX = 96
DECODERS = ("exact", "tsort", "beam")

_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
# The page may talk only to this server; data: and blob: images are the thumbnails and the
# local previews of the chosen files.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class RequestError(IterWeGOError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _limits() -> dict:
    return {
        "max_body_bytes": MAX_BODY_BYTES,
        "max_items": MAX_ITEMS,
        "max_exact": MAX_EXACT,
        "decoders": list(DECODERS),
        "capture_time_modes": list(CAPTURE_MODES),
    }


def _b64(data: str, what: str) -> bytes:
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or not head.endswith(";base64"):
            raise RequestError(f"{what}: a data: URI must be base64-encoded (data:...;base64,...)")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what}: not valid base64") from None


def _thumbnail(im) -> str:
    """A data URI of ``im`` with its longer side at most ``THUMB_PX`` (never upscaled).

    JPEG keeps photos small; tiny pictures are sent as PNG because the page
    enlarges them and JPEG's artefacts would then be what the user sees.
    """
    im = im.copy()
    im.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    fmt = "PNG" if max(im.size) <= SMALL_PX else "JPEG"
    im.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _uploads(images: list) -> tuple[list[str], list[bytes]]:
    """The uploads' file names (base names, default ``imageK``) and their bytes."""
    names = []
    for k, im in enumerate(images):
        if not isinstance(im, dict) or not isinstance(im.get("data"), str):
            raise RequestError(f"image {k + 1} must be an object with a base64 'data' string")
        name = im.get("name") if isinstance(im.get("name"), str) and im.get("name") else f"image{k + 1}"
        names.append(Path(name.replace("\\", "/")).name or f"image{k + 1}")
    blobs = [_b64(im["data"], f"image {k + 1} ({names[k]})") for k, im in enumerate(images)]
    return names, blobs


class OrderService:
    """A loaded run plus the request logic of ``/api/order`` (no HTTP in here, so it is testable alone).

    ``tmp_root`` is where the per-request temporary directories go (default: the
    system temporary directory). Requests are served one at a time: the model is
    shared and a 2-core machine gains nothing from running two at once.
    """

    def __init__(
        self,
        model,
        meta: dict,
        *,
        run_name: str = "",
        tmp_root: str | Path | None = None,
        capture_time: str = "auto",
    ):
        self.model, self.meta, self.run_name = model, meta, run_name
        self.tmp_root = str(tmp_root) if tmp_root is not None else None
        self.capture_time = capture_time  # the page's default; each request may choose another
        self._lock = threading.Lock()

    @classmethod
    def load(cls, run: str | Path, device: str | None = None, *, load_kw: dict | None = None, **kw) -> "OrderService":
        """Load ``run`` (a run directory or a Hub id; ``load_kw`` as for ``load_run``) once, on CUDA when available.

        Raises:
            ModelLoadError: the run directory is missing, incomplete or incompatible, or the Hub id unknown.
        """
        from ..device import pick_device
        from ..model import load_run

        dev = device or pick_device()
        model, meta = load_run(run, dev, **(load_kw or {}))
        return cls(model, meta, run_name=Path(run).name, **kw)

    def info(self) -> dict:
        """What the page shows before the first request: run, usable modalities, limits."""
        from ..result import inference_settings

        mods = [m for m in ("image", "text") if getattr(self.model, m, None) is not None]
        return {
            "run": self.run_name,
            "modalities": mods,
            "aligner": getattr(self.model, "aligner", None) is not None,
            "chosen_rounds": inference_settings(self.model.cfg).rounds,
            "fusion": self.model.cfg.fusion.method,  # how the fused variant is made: "orderer" | "sum"
            "capture_time": self.capture_time,
            "limits": _limits(),
            "version": __version__,
        }

    def _checked(self, payload: Any) -> tuple[list, list[str], str, str]:
        """``(images, sentences, decoder, capture_time)`` of a valid payload; RequestError otherwise."""
        if not isinstance(payload, dict):
            raise RequestError("the request body must be a JSON object")
        images, sentences = payload.get("images") or [], payload.get("sentences") or []
        decoder = payload.get("decoder", "exact")
        capture_time = payload.get("capture_time", self.capture_time)
        if not isinstance(images, list) or not isinstance(sentences, list):
            raise RequestError("'images' and 'sentences' must be lists")
        if decoder not in DECODERS:
            raise RequestError(f"'decoder' must be one of {', '.join(DECODERS)}, got {decoder!r}")
        if capture_time not in CAPTURE_MODES:
            raise RequestError(f"'capture_time' must be one of {', '.join(CAPTURE_MODES)}, got {capture_time!r}")
        for what, items in (("images", images), ("sentences", sentences)):
            if len(items) > MAX_ITEMS:
                raise RequestError(
                    f"too many {what}: {len(items)}; "
                    f"this server orders at most {MAX_ITEMS} images and {MAX_ITEMS} sentences "
                    f"per request (up to {MAX_EXACT} items are ordered with the exact decoder, "
                    "larger sets with beam search)"
                )
        for k, s in enumerate(sentences):
            if not isinstance(s, str) or not s.strip():
                raise RequestError(f"sentence {k + 1} must be a non-empty string")
        sentences = [s.strip() for s in sentences]
        if max(len(images), len(sentences)) < 2:
            raise RequestError(
                "nothing to order: give at least 2 images or 2 sentences "
                f"(got {len(images)} image(s) and {len(sentences)} sentence(s))"
            )
        return images, sentences, decoder, capture_time

    def order(self, payload: Any) -> dict:
        """Validate one ``/api/order`` payload, order it and return the response dictionary.

        Raises:
            RequestError: malformed payload, too many or too few items.
            ImageError: an upload is not a usable image (message names the uploaded file).
            IterWeGOError: anything else ``order_stories`` rejects.
        """
        from ..images import check_image, load_image
        from .order import order_stories, stories_from_args

        images, sentences, decoder, capture_time = self._checked(payload)
        names, blobs = _uploads(images)

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="iterwego-serve-", dir=self.tmp_root) as tmp:
            paths, thumbs = [], []
            for k, (name, blob) in enumerate(zip(names, blobs)):
                # one folder per upload keeps the user's file name (two uploads may share it)
                p = Path(tmp) / f"{k:03d}" / (_SAFE_NAME.sub("_", name).lstrip(".") or "image")
                p.parent.mkdir()
                p.write_bytes(blob)
                try:
                    thumbs.append(_thumbnail(load_image(p)))
                except ImageError:
                    raise ImageError(check_image(p) or "not a usable image", path=name) from None
                paths.append(str(p))
            stories = stories_from_args(paths, sentences)
            with self._lock:
                result = order_stories(self.model, stories, decoder=decoder, capture_time=capture_time)[0]
        result["images"] = names
        notes = []
        if decoder == "exact" and max(len(images), len(sentences)) > MAX_EXACT:
            notes.append(f"more than {MAX_EXACT} items: ordered with beam search instead of exact decoding")
        if images and "image" not in self.info()["modalities"]:
            notes.append("this run has no image orderer: the images were not ordered")
        if sentences and "text" not in self.info()["modalities"]:
            notes.append("this run has no sentence orderer: the sentences were not ordered")
        order = result.get("image_order", list(range(len(names))))
        return {
            "result": result,
            "thumbnails": [{"index": int(i), "name": names[i], "src": thumbs[i]} for i in order],
            "notes": notes,
            "elapsed_s": round(time.perf_counter() - t0, 4),
        }


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: "AppServer"
    server_version = f"iterwego/{__version__}"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature fixed by the base class
        if self.server.log is not None:
            self.server.log.write(f"{self.address_string()} {format % args}\n")

    def _send(self, status: int, body: bytes, ctype: str, *, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-cache" if cache else "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self.close_connection = True
        self._json(status, {"error": message})

    def _host_ok(self) -> bool:
        # A page on another site could point a name it controls at 127.0.0.1 (DNS rebinding);
        # on a loopback bind only loopback Host headers are served.
        if not _is_loopback(self.server.server_address[0]):
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        return _is_loopback(host)

    def do_GET(self) -> None:  # noqa: N802 - name fixed by the base class
        if not self._host_ok():
            return self._error(400, "unexpected Host header")
        path = self.path.split("?", 1)[0]
        if path == "/api/info":
            return self._json(200, self.server.service.info())
        if path in _STATIC:
            name, ctype = _STATIC[path]
            return self._send(200, self.server.static[name], ctype, cache=True)
        self._error(404, f"not found: {path}")

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return self._error(400, "unexpected Host header")
        if self.path.split("?", 1)[0] != "/api/order":
            return self._error(404, f"not found: {self.path}")
        # a JSON content type also forces a CORS preflight, which this server never grants
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            return self._error(415, "send the request as application/json")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(411, "a Content-Length header is required")
        if length < 0:
            return self._error(400, "invalid Content-Length")
        if length > self.server.max_body:
            mb = self.server.max_body / 2**20
            return self._error(
                413, f"request too large: {length / 2**20:.1f} MB (limit {mb:.0f} MB); send fewer or smaller images"
            )
        try:
            payload = json.loads(self.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return self._error(400, f"the request body is not valid JSON ({err})")
        try:
            answer = self.server.service.order(payload)
        except RequestError as err:
            return self._error(err.status, str(err))
        except IterWeGOError as err:
            return self._error(400, str(err))
        except Exception as err:  # the server must outlive any one bad request
            traceback.print_exc(file=sys.stderr)
            return self._error(500, f"internal error ({type(err).__name__}: {err})")
        self._json(200, answer)


class AppServer(ThreadingHTTPServer):
    """The HTTP server: holds the :class:`OrderService` and the page's files (read once)."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        service: OrderService,
        *,
        max_body: int = MAX_BODY_BYTES,
        log: TextIO | None = None,
    ):
        self.service, self.max_body, self.log = service, max_body, log
        web = resources.files("iterwego.apps") / "web"
        self.static = {name: (web / name).read_bytes() for name, _ in _STATIC.values()}
        if ":" in address[0]:  # an IPv6 literal such as ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"


def make_server(service: OrderService, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **kw) -> AppServer:
    """Bind (not yet serve) the app on ``host:port``; ``port=0`` picks a free port.

    Raises:
        IterWeGOError: the address cannot be bound (in use, not local, ...).
    """
    try:
        return AppServer((host, port), service, **kw)
    except OSError as err:
        raise IterWeGOError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None


def run_server(
    server: AppServer, *, out: TextIO = sys.stdout, on_ready: Callable[[AppServer], None] | None = None
) -> None:
    """Print the URL, then serve until interrupted (Ctrl-C) or ``server.shutdown()``."""
    if not _is_loopback(server.server_address[0]):
        print(
            f"warning: listening on {server.server_address[0]}: anyone who can reach this machine can use the app",
            file=out,
        )
    print(f"iterwego serve: ready at {server.url}  (Ctrl-C to stop)", file=out, flush=True)
    if on_ready is not None:
        on_ready(server)
    try:
        server.serve_forever()
    finally:
        server.server_close()
