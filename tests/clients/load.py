#!/usr/bin/env python3
"""A real HTTP/1.1 client for the end-to-end tests: N requests over C concurrent keep-alive
connections (TLS or plaintext), with a list of response sizes, reporting exactly what it sent
and received so tests can compare the agent's records field by field.

usage: load.py --url https://127.0.0.1:8443 [--cafile C] --requests N --connections C
               --sizes 0,1,65536 [--method GET|POST] [--out FILE]
Each request i asks GET /api/test/bytes/<sizes[i % len(sizes)]> (or POSTs that many bytes to
/api/test/echo). Output JSON: {"requests": [{"conn": k, "local_port": p, "method": m,
"path": path, "status": s, "response_bytes": n, "request_bytes": n}], "errors": [...]}.
"""
import argparse
import http.client
import json
import ssl
import sys
import threading
import urllib.parse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--cafile")
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--sizes", default="0,1,1024")
    ap.add_argument("--method", default="GET")
    ap.add_argument("--out")
    a = ap.parse_args()
    u = urllib.parse.urlsplit(a.url)
    sizes = [int(s) for s in a.sizes.split(",")]
    results = [None] * a.requests
    errors = []
    lock = threading.Lock()

    def worker(k):
        if u.scheme == "https":
            ctx = ssl.create_default_context(cafile=a.cafile)
            conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=60)
        else:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        conn.connect()
        port = conn.sock.getsockname()[1]
        for i in range(k, a.requests, a.connections):
            n = sizes[i % len(sizes)]
            try:
                if a.method == "POST":
                    body = bytes((j * 7) % 251 for j in range(n))
                    path = "/api/test/echo"
                    conn.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
                else:
                    body = b""
                    path = f"/api/test/bytes/{n}"
                    conn.request("GET", path)
                r = conn.getresponse()
                data = r.read()
                results[i] = {"conn": k, "local_port": port, "method": a.method, "path": path,
                              "status": r.status, "response_bytes": len(data), "request_bytes": len(body)}
            except Exception as e:  # noqa: BLE001 - reported, and the exit code says it
                with lock:
                    errors.append(f"request {i}: {e!r}")
                return
        conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(a.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {"requests": [r for r in results if r is not None], "errors": errors}
    text = json.dumps(out)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
