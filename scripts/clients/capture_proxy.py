"""A tiny logging HTTP proxy on loopback: it forwards every request to the service and records what the client sent
and what the service answered, so that a failing client can be shown request by request (stdlib only).

    python capture_proxy.py serve --upstream http://127.0.0.1:PORT --port-file F --log LOG   # until killed
    python capture_proxy.py show LOG                                                        # print the exchanges

The proxy buffers each response before passing it on (a stream arrives at the client whole), so it serves to capture
requests, not to judge streaming; scripts/check_clients.sh runs the clients against the service directly and only
reruns a failing one through this proxy. The Authorization header is recorded as "Bearer ***".
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
              "content-length", "host"}
BODY_CHARS = 4000


class Capture(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: urllib.parse.SplitResult
    log_path: str
    lock = threading.Lock()
    count = 0

    def _read_body(self) -> tuple[bytes, bool]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts), True
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return (self.rfile.read(n) if n else b""), False

    def _forward(self) -> None:
        body, chunked = self._read_body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=300)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
        except OSError as exc:
            data = json.dumps({"error": {"type": "proxy_error", "message": str(exc)}}).encode()
            status, reason, resp_headers = 502, "Bad Gateway", [("Content-Type", "application/json")]
        finally:
            conn.close()
        self._record(body, chunked, status, resp_headers, data)
        self.send_response(status, reason)
        for k, v in resp_headers:
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body: bytes, chunked: bool, status: int, resp_headers: list, data: bytes) -> None:
        req_headers = {k.lower(): ("Bearer ***" if k.lower() == "authorization" else v)
                       for k, v in self.headers.items()}
        with self.lock:
            Capture.count += 1
            entry = {"n": Capture.count, "method": self.command, "path": self.path, "request_headers": req_headers,
                     "request_chunked": chunked, "request_body": body.decode(errors="replace"), "status": status,
                     "response_content_type": dict((k.lower(), v) for k, v in resp_headers).get("content-type"),
                     "response_body": data.decode(errors="replace")}
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _forward

    def log_message(self, format: str, *args) -> None:  # quiet: the log file has it all
        pass


def serve(args: argparse.Namespace) -> None:
    Capture.upstream = urllib.parse.urlsplit(args.upstream)
    Capture.log_path = args.log
    server = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    server.daemon_threads = True
    with open(args.port_file, "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


def _clip(text: str) -> str:
    return text if len(text) <= BODY_CHARS else text[:BODY_CHARS] + f"... ({len(text)} chars)"


def show(args: argparse.Namespace) -> None:
    try:
        with open(args.log) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    if not lines:
        print("(no request reached the capture proxy)")
    for line in lines:
        e = json.loads(line)
        print(f"request {e['n']}: {e['method']} {e['path']}"
              + ("  (body sent chunked)" if e["request_chunked"] else ""))
        print("  headers: " + "; ".join(f"{k}: {v}" for k, v in e["request_headers"].items()))
        if e["request_body"]:
            print(f"  body: {_clip(e['request_body'])}")
        print(f"  -> {e['status']} {e['response_content_type'] or ''}".rstrip())
        print("  " + _clip(e["response_body"]).rstrip().replace("\n", "\n  "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("serve", help="forward to --upstream, logging to --log; write the port to --port-file")
    s.add_argument("--upstream", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--port-file", required=True)
    d = sub.add_parser("show", help="print the exchanges of a log")
    d.add_argument("log")
    args = p.parse_args()
    if args.action == "serve":
        serve(args)
    else:
        show(args)


if __name__ == "__main__":
    main()
