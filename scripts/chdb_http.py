#!/usr/bin/env python3
"""Minimal ClickHouse HTTP interface on top of chdb (the in-process ClickHouse engine).

Purpose: let spillway's ClickHouse sink, which speaks ClickHouse's HTTP protocol, be tested
against a current ClickHouse engine (chdb-core 26.9) when the only installable server is 18.16.

    python3 scripts/chdb_http.py --port 18124 --path /tmp/chdb-data

Supported: GET /ping; GET|POST /?query=... (query param + "\\n" + body, or body alone), gzip
request bodies, `database`, `param_<name>` query parameters, any other URL param applied as a
ClickHouse setting (SET before the query, restored afterwards), default_format, gzip responses
with enable_http_compression=1, ClickHouse-style error bodies and X-ClickHouse-Exception-Code.

Limits: one shared chdb session and one lock, so queries run one at a time; results are
buffered (no streaming, no progress headers); credentials are accepted but never checked;
no readonly mode for GET; no sessions (session_id is ignored, but a client's own SET/USE
statements do persist in the shared chdb session); request bodies must be UTF-8 text
(no RowBinary/Native input); multi-statement queries are accepted (the real server rejects them).
"""
import argparse
import gzip
import os
import re
import signal
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from chdb import session as chdb_session

IGNORED = {"query", "database", "user", "password", "query_id", "session_id", "default_format",
           "wait_end_of_query", "compress", "decompress", "session_timeout", "session_check",
           "quota_key"}
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

LOCK = threading.Lock()
SESSION = None
VERSION = "unknown"


def sql_str(v):
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run(sql, fmt="TabSeparated", params=None):
    return SESSION.query(sql, fmt, params=params or None).bytes()


def execute(sql, fmt, database, settings, params):
    """Runs one request's query under the lock; settings are SET first and restored after."""
    with LOCK:
        saved = []
        try:
            if settings:
                bad = [k for k in settings if not SETTING_NAME.match(k)]
                if bad:
                    raise RuntimeError(f"Code: 115. DB::Exception: Unknown setting '{bad[0]}'. (UNKNOWN_SETTING)")
                names = ", ".join(sql_str(k) for k in settings)
                out = run(f"SELECT name, value, changed FROM system.settings WHERE name IN ({names})")
                saved = [line.split("\t") for line in out.decode().splitlines()]
                run("SET " + ", ".join(f"{k} = {sql_str(v)}" for k, v in settings.items()))
            if database:
                run(f"USE `{database.replace('`', '')}`")
            return run(sql, fmt, params)
        finally:
            try:
                if database:
                    run("USE default")
                for name, value, changed in saved:
                    # unescape TSV-escaped values before restoring them
                    value = value.replace("\\t", "\t").replace("\\n", "\n").replace("\\\\", "\\")
                    run(f"SET {name} = " + (sql_str(value) if changed == "1" else "DEFAULT"))
            except Exception as e:  # never leave the lock with a broken state unreported
                print(f"chdb_http: failed to restore session state: {e}", file=sys.stderr, flush=True)


def error_body(msg):
    msg = msg.strip()
    m = re.search(r"Code: (\d+)\.", msg)
    code = m.group(1) if m else "1000"
    if not m:
        msg = f"Code: {code}. DB::Exception: {msg}. (STD_EXCEPTION)"
    if "(version " not in msg:
        msg += f" (version {VERSION} (chdb))"
    return code, (msg + "\n").encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chdb_http"

    def log_message(self, fmt, *args):
        if os.environ.get("CHDB_HTTP_LOG"):
            super().log_message(fmt, *args)

    def reply(self, status, body, headers=None):
        headers = dict(headers or {})
        if status == 200 and len(body) > 0 and self._gzip_ok:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        self.send_response(status)
        headers.setdefault("Content-Type", "text/plain; charset=UTF-8")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("X-ClickHouse-Query-Id", self._query_id)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def fail(self, status, msg):
        code, body = error_body(msg)
        self.reply(status, body, {"X-ClickHouse-Exception-Code": code})

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        self.handle_query(b"")

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self.read_chunked()
        self.handle_query(body)

    def read_chunked(self):
        out = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()

    def handle_query(self, body):
        url = urlsplit(self.path)
        args = dict(parse_qsl(url.query, keep_blank_values=True))
        self._query_id = args.get("query_id") or str(uuid.uuid4())
        self._gzip_ok = (args.get("enable_http_compression") == "1"
                         and "gzip" in self.headers.get("Accept-Encoding", ""))
        if url.path in ("/ping", "/replicas_status"):
            return self.reply(200, b"Ok.\n")
        if url.path != "/":
            return self.fail(404, f"Code: 0. DB::Exception: There is no handle {url.path}. (UNKNOWN_HANDLER)")
        enc = self.headers.get("Content-Encoding", "").lower()
        try:
            if enc in ("gzip", "x-gzip"):
                body = gzip.decompress(body)
            elif enc not in ("", "identity"):
                raise ValueError(f"Unknown Content-Encoding: {enc}")
        except Exception as e:
            return self.fail(400, f"Code: 354. DB::Exception: Cannot decompress request body: {e}. (ZLIB_INFLATE_FAILED)")
        text = body.decode("utf-8", errors="replace")
        query = args.get("query")
        sql = query + ("\n" + text if text else "") if query is not None else text
        if not sql.strip():
            if self.command in ("GET", "HEAD") and query is None:
                return self.reply(200, b"Ok.\n")
            return self.fail(400, "Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)")
        params = {k[6:]: v for k, v in args.items() if k.startswith("param_")}
        settings = {k: v for k, v in args.items() if k not in IGNORED and not k.startswith("param_")}
        fmt = args.get("default_format") or "TabSeparated"
        try:
            out = execute(sql, fmt, args.get("database"), settings, params)
        except Exception as e:
            return self.fail(500, str(e))
        self.reply(200, out)


def main():
    global SESSION, VERSION
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", required=True, help="chdb data directory (created if missing)")
    a = ap.parse_args()
    os.makedirs(a.path, exist_ok=True)
    SESSION = chdb_session.Session(os.path.abspath(a.path))
    VERSION = run("SELECT version()").decode().strip()
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"ready on 127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        with LOCK:
            SESSION.close()


if __name__ == "__main__":
    main()
