#!/usr/bin/env python3
"""A scripted scraper for the demo platform: one account, one keep-alive HTTPS
connection (a fresh one after a failure), paging through the address book.

    python3 scraper.py --base https://127.0.0.1:8443 --cafile CERT \
        --username p1013 --password PW --school sch-01 --pages 4 --rounds 10 \
        [--page-size 100] [--interval 0.05] [--give-up 3] --out result.json

Logs in (form, session cookie), then `rounds` times walks pages 1..pages of
GET /api/addressbook/persons?schoolId=S&page=N&pageSize=Z, waiting
`interval` seconds between requests. A request that gets no answer (reset,
or nothing within 3 s) is a failure; after `give-up` failures in a row it
stops. Writes {"requests": [{"seq", "path", "status", "error", "sentAt"}]}
(status null on failure; sentAt in Unix seconds). Python 3.11 stdlib only.
"""

import argparse
import http.client
import json
import ssl
import sys
import time
from urllib.parse import urlencode, urlsplit


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--cafile", required=True)
    ap.add_argument("--username", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--school", required=True)
    ap.add_argument("--pages", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--page-size", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--give-up", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    u = urlsplit(a.base)
    ctx = ssl.create_default_context(cafile=a.cafile)
    conn = None
    cookie = None
    out = []

    def call(method, path, body=None, ctype=None):
        nonlocal conn, cookie
        headers = {"Accept": "application/json"}
        if ctype:
            headers["Content-Type"] = ctype
        if cookie:
            headers["Cookie"] = "skolsid=" + cookie
        entry = {"seq": len(out), "path": path, "status": None, "error": None,
                 "sentAt": time.time()}
        try:
            if conn is None:
                conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=3)
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            entry["status"] = resp.status
            for k, v in resp.getheaders():
                if k.lower() == "set-cookie" and v.startswith("skolsid="):
                    cookie = v.split(";", 1)[0].split("=", 1)[1]
        except (OSError, http.client.HTTPException) as e:
            entry["error"] = f"{type(e).__name__}: {e}"
            data = None
            if conn:
                conn.close()
            conn = None
        out.append(entry)
        return entry["status"], data

    status, _ = call("POST", "/login", urlencode({"username": a.username,
                                                  "password": a.password}),
                     "application/x-www-form-urlencoded")
    if status != 200:
        print(f"login failed: {status}", file=sys.stderr)
        return 1
    failures = 0
    for _ in range(a.rounds):
        for page in range(1, a.pages + 1):
            time.sleep(a.interval)
            q = urlencode({"schoolId": a.school, "page": page, "pageSize": a.page_size})
            status, _ = call("GET", "/api/addressbook/persons?" + q)
            failures = failures + 1 if status is None else 0
            if failures >= a.give_up:
                break
        if failures >= a.give_up:
            break
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump({"requests": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
