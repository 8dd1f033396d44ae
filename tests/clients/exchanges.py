#!/usr/bin/env python3
"""A byte-exact HTTP/1.1 client for the edge-case end-to-end tests (tests/tests/e2e_edge.rs).

Unlike load.py it parses the responses itself, so it can report what was on the wire: the length
of the response head (status line and headers up to and including the empty line), the body as
received (chunked framing removed, content encoding NOT decoded) and, for gzip bodies, the length
after decoding. IPv4 and IPv6 (`http://[::1]:8080`), TLS (ALPN http/1.1) or plaintext.

usage: exchanges.py --url URL [--cafile C] [--connections C] [--rounds R]
                    --paths /a,/b,... [--login USER:PASSWORD] [--accept-encoding gzip]

Each of C connections (one after the other) first does `POST /login` when --login is given
(form-encoded; the session cookie it sets is sent on the later requests of that connection),
then sends every path of --paths in order, R times, on the same keep-alive connection.
Output JSON: {"requests": [{"conn", "local_port", "method", "path", "status", "request_bytes",
"response_bytes", "head_bytes", "decoded_bytes", "transfer_encoding", "content_encoding",
"cookie"}], "errors": [...]}. `cookie` is the session cookie (name=value) held after that
request, so a test can check that it never reaches the agent's records. Exit 1 when a request
failed.
"""
import argparse
import gzip
import json
import socket
import ssl
import sys
import urllib.parse


class Conn:
    def __init__(self, u, cafile):
        host = u.hostname
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect((host, u.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local_port = s.getsockname()[1]
        if u.scheme == "https":
            ctx = ssl.create_default_context(cafile=cafile)
            ctx.set_alpn_protocols(["http/1.1"])
            s = ctx.wrap_socket(s, server_hostname=host)
        self.s = s
        self.buf = b""
        self.cookie = None
        self.host = f"[{host}]:{u.port}" if ":" in host else f"{host}:{u.port}"

    def _fill(self):
        d = self.s.recv(1 << 16)
        if not d:
            raise ConnectionError("connection closed by the server")
        self.buf += d

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def request(self, method, path, body=b"", headers=()):
        hs = [("Host", self.host)] + list(headers)
        if self.cookie:
            hs.append(("Cookie", self.cookie))
        if body or method == "POST":
            hs.append(("Content-Length", str(len(body))))
        raw = f"{method} {path} HTTP/1.1\r\n".encode()
        raw += b"".join(f"{k}: {v}\r\n".encode() for k, v in hs) + b"\r\n" + body
        self.s.sendall(raw)
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        head_bytes = len(head) + 4
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            k, v = line.split(":", 1)
            headers.setdefault(k.strip().lower(), []).append(v.strip())
        te = ",".join(headers.get("transfer-encoding", [])) or None
        ce = ",".join(headers.get("content-encoding", [])) or None
        for sc in headers.get("set-cookie", []):
            self.cookie = sc.split(";", 1)[0]
        cookie = self.cookie
        if method == "HEAD" or status in (204, 304) or status // 100 == 1:
            data = b""
        elif te and "chunked" in te.lower():
            parts = []
            while True:
                size = int(self._line().split(b";")[0].strip(), 16)
                if size == 0:
                    while self._line() != b"":
                        pass
                    break
                parts.append(self._take(size))
                self._take(2)
            data = b"".join(parts)
        else:
            data = self._take(int(headers.get("content-length", ["0"])[0]))
        decoded = gzip.decompress(data) if ce == "gzip" else data
        return {"status": status, "head_bytes": head_bytes, "response_bytes": len(data),
                "decoded_bytes": len(decoded), "transfer_encoding": te,
                "content_encoding": ce, "request_bytes": len(body), "cookie": cookie}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--cafile")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--paths", required=True)
    ap.add_argument("--login")
    ap.add_argument("--accept-encoding")
    a = ap.parse_args()
    u = urllib.parse.urlsplit(a.url)
    paths = a.paths.split(",")
    out, errors = [], []
    extra = [("Accept-Encoding", a.accept_encoding)] if a.accept_encoding else []
    for k in range(a.connections):
        try:
            c = Conn(u, a.cafile)
        except Exception as e:  # noqa: BLE001 - reported, and the exit code says it
            errors.append(f"connection {k}: {e!r}")
            continue
        todo = []
        if a.login:
            user, pw = a.login.split(":", 1)
            body = urllib.parse.urlencode({"username": user, "password": pw}).encode()
            todo.append(("POST", "/login", body,
                         [("Content-Type", "application/x-www-form-urlencoded")]))
        todo += [("GET", p, b"", extra) for p in paths] * a.rounds
        for method, path, body, hs in todo:
            try:
                r = c.request(method, path, body, hs)
            except Exception as e:  # noqa: BLE001
                errors.append(f"connection {k} {method} {path}: {e!r}")
                break
            r.update({"conn": k, "local_port": c.local_port, "method": method, "path": path})
            out.append(r)
        c.s.close()
    print(json.dumps({"requests": out, "errors": errors}))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
