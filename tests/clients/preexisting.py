#!/usr/bin/env python3
"""Connections that exist before the agent starts: opens C keep-alive connections and sends one
request on each, prints "OPEN" and waits for a line on stdin (the test starts the agent then),
sends K more requests on each of the same connections, and prints a JSON report of those later
requests only (same shape as load.py's).

usage: preexisting.py --url https://127.0.0.1:8443 --cafile C --connections C --requests K --size N
"""
import argparse
import http.client
import json
import ssl
import sys
import urllib.parse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--cafile")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--size", type=int, default=1000)
    a = ap.parse_args()
    u = urllib.parse.urlsplit(a.url)
    conns = []
    for _ in range(a.connections):
        if u.scheme == "https":
            c = http.client.HTTPSConnection(u.hostname, u.port, context=ssl.create_default_context(cafile=a.cafile), timeout=60)
        else:
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        c.request("GET", f"/api/test/bytes/{a.size}")
        c.getresponse().read()
        conns.append(c)
    print("OPEN", flush=True)
    sys.stdin.readline()
    out = []
    for k, c in enumerate(conns):
        port = c.sock.getsockname()[1]
        for _ in range(a.requests):
            path = f"/api/test/bytes/{a.size}"
            c.request("GET", path)
            r = c.getresponse()
            data = r.read()
            out.append({"conn": k, "local_port": port, "method": "GET", "path": path, "status": r.status,
                        "response_bytes": len(data), "request_bytes": 0})
        c.close()
    print(json.dumps({"requests": out, "errors": []}), flush=True)


if __name__ == "__main__":
    main()
