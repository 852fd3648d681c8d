"""A small local web app for ranking: stdlib ThreadingHTTPServer, one static page, a JSON API.

    GET  /                          the labelling page (page.html, no external resources)
    GET  /api/next?labeler=NAME     {"item": {id, prompt, responses} | null, "progress": {done, total}}
    POST /api/submit                {labeler, id, ranks | skipped, flags} -> {"recorded": bool, ...next}
    GET  /api/stats                 per-labeler counts and agreement of the rankings file

No authentication: it binds to 127.0.0.1 unless told otherwise. Because a web page elsewhere can still make the
labeler's browser send requests to localhost, requests must name this server in their Host header (stops DNS
rebinding) and POSTs must be application/json (a cross-site form cannot send that without a CORS preflight,
which this server never grants).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lora_rlhf.errors import DataError
from lora_rlhf.labeling.judgement import FLAG_LABELS
from lora_rlhf.labeling.session import LabelSession
from lora_rlhf.labeling.stats import compute_stats

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20  # a judgement is a few hundred bytes
READ_TIMEOUT = 30.0  # seconds a connection may stay silent mid-request


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C must not wait for an idle keep-alive connection
    # The listen backlog: socketserver's 5 dropped connections of a burst (100 labelers submitting at once lost
    # ~half to timeouts); the kernel caps it at net.core.somaxconn.
    request_queue_size = 1024

    def __init__(self, session: LabelSession, host: str = "127.0.0.1", port: int = 0,
                 default_labeler: str | None = None):
        self.session = session
        self.default_labeler = default_labeler
        super().__init__((host, port), _Handler)
        page = files("lora_rlhf.labeling").joinpath("page.html").read_text(encoding="utf-8")
        config = json.dumps({"labeler": default_labeler or "", "flags": list(FLAG_LABELS)}).replace("</", "<\\/")
        self.page = page.replace("/*__CONFIG__*/null", config).encode("utf-8")

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        shown = f"[{host}]" if ":" in host else host
        query = f"?labeler={self.default_labeler}" if self.default_labeler else ""
        return f"http://{shown}:{self.port}/{query}"

    def allowed_hosts(self) -> set[str] | None:
        """Host headers accepted; None (any) when the user chose a non-loopback address on purpose."""
        host = self.server_address[0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            return None
        return {f"{name}:{self.port}" for name in ("127.0.0.1", "localhost", "[::1]", host)}


class _Handler(BaseHTTPRequestHandler):
    server: LabelServer
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT  # a client that sends less than it announced must not hold a thread forever

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy",
                         "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _error(self, status: int, what: str, fix: str | None = None) -> None:
        self._json(status, {"error": what, "fix": fix})

    def _host_ok(self) -> bool:
        allowed = self.server.allowed_hosts()
        if allowed is None or self.headers.get("Host", "") in allowed:
            return True
        self._error(HTTPStatus.FORBIDDEN, "unexpected Host header", "open the URL the server printed")
        return False

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if not self._host_ok():
            return
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        try:
            if url.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
            elif url.path == "/api/next":
                labeler = query.get("labeler", [""])[0]
                self._json(HTTPStatus.OK, self.server.session.next_item(labeler))
            elif url.path == "/api/stats":
                self._json(HTTPStatus.OK, compute_stats(self.server.session.store.path, missing_ok=True))
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")
        except DataError as e:
            self._error(HTTPStatus.BAD_REQUEST, e.what, e.fix)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if not self._host_ok():
            return
        if urlsplit(self.path).path != "/api/submit":
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path}")
            return
        if self.headers.get_content_type() != "application/json":
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "POST a JSON body (Content-Type: application/json)")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            self.close_connection = True  # the body's end is unknown: this connection cannot carry another request
            self._error(HTTPStatus.BAD_REQUEST, f"body must be 1..{MAX_BODY} bytes")
            return
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "body is not a JSON object")
            return
        except RecursionError:  # nested deeper than the parser's stack: no judgement looks like that
            self._error(HTTPStatus.BAD_REQUEST, "body is nested too deep to be a judgement")
            return
        session = self.server.session
        try:
            labeler = body.get("labeler", "")
            recorded = session.submit(labeler, body.get("id"), ranks=body.get("ranks"), flags=body.get("flags"),
                                      skipped=body.get("skipped") is True)
            self._json(HTTPStatus.OK if recorded else HTTPStatus.CONFLICT,
                       {"recorded": recorded, **session.next_item(labeler)})
        except DataError as e:
            self._error(HTTPStatus.BAD_REQUEST, e.what, e.fix)
        except OSError as e:  # a full disk or a vanished folder: say so instead of dropping the connection
            self._error(HTTPStatus.INSUFFICIENT_STORAGE, f"the judgement could not be saved ({e.strerror}); "
                        "nothing was recorded for it", "free disk space next to the rankings file, then submit again")
