#!/usr/bin/env python3
"""Crafted HTTP/1.x requests for the differential suite (tests/tests/differential.rs).

Python 3.11 standard library only.

    crafted.py generate [--seed 12] --out tests/corpus/crafted.jsonl
        Writes the corpus: one JSON object per line, {"id","family","note","raw"}, where
        "raw" is the request's bytes as a latin-1 string (control bytes escaped by JSON) with
        placeholders the sender fills in: @HOST@ @RID@ @SID_A@ @SID_B@ @JWT_A@ @FORGED_B@
        @SCHOOL_A@ @SCHOOL_B@ @PERSON_A@ @PERSON_B@.  Deterministic: the same seed writes the
        same bytes (the committed corpus is checked against it, and the fuzzers seed from it).

    crafted.py login --port P --cafile C --data dataset.json --out creds.json
        Logs in pupil A (sch-01) and pupil B (sch-02) through the edge, gets A's JWT from
        /api/token, and writes the placeholders' values.  @FORGED_B@ is an unsigned JWT
        (alg "none") naming B: the platform refuses it.

    crafted.py send --corpus FILE --creds creds.json --port P --cafile C --out results.jsonl
                    [--ids-from FILE] [--rid-prefix P] [--parallel 12] [--timeout 1.5]
        Sends every case raw over TLS, one connection per case (so the agent's source.port
        joins a case to its record), and writes one line per case: id, family, local_port,
        sent bytes, the statuses of every response read until the server closed (or the
        timeout), and an error if the connection failed.  --ids-from FILE sends only the ids
        listed in FILE (one a line).

The user A is "the pupil" of the incident; B is a pupil of another school.  Every request
carries ``X-Request-Id: @RID@`` (the case id) so the upstream's line (app.py --record) joins
to the case; most close the connection (``Connection: close``) so the client knows when the
server has said everything.
"""

import argparse
import base64
import concurrent.futures
import json
import random
import socket
import ssl
import sys
import urllib.parse
import urllib.request

CRLF = "\r\n"

# Targets on routes the agent records (tests/demo/sparbar.demo.toml).
TARGETS = [
    "/api/me",
    "/api/addressbook/persons?schoolId=@SCHOOL_A@&page=1&pageSize=20",
    "/api/addressbook/persons?schoolId=@SCHOOL_B@&page=1&pageSize=20",
    "/api/addressbook/schools/@SCHOOL_B@/persons?page=2&pageSize=10",
    "/api/addressbook/persons/@PERSON_B@",
    "/api/addressbook/search?q=Al",
]
COOKIE_A = "Cookie: skolsid=@SID_A@"
BEARER_A = "Authorization: Bearer @JWT_A@"


def head(request_line, headers, eol=CRLF, body=""):
    return request_line + eol + "".join(h + eol for h in headers) + eol + body


def std_headers(*extra, close=True):
    hs = ["Host: @HOST@", "X-Request-Id: @RID@", "User-Agent: crafted/1", "Accept: */*"]
    hs += list(extra)
    if close:
        hs.append("Connection: close")
    return hs


def get(target, *extra, method="GET", version="HTTP/1.1"):
    return head(f"{method} {target} {version}", std_headers(*extra))


class Corpus:
    def __init__(self, seed):
        self.rng = random.Random(f"crafted:{seed}")
        self.cases = []
        self.counts = {}

    def add(self, family, note, raw):
        n = self.counts.get(family, 0) + 1
        self.counts[family] = n
        self.cases.append({"id": f"{family}-{n:03d}", "family": family, "note": note,
                           "raw": raw})

    def pick(self, seq, k):
        return self.rng.sample(seq, k)


def gen_controls(c):
    for t in TARGETS:
        c.add("control", f"honest GET {t} with A's cookie", get(t, COOKIE_A))
        c.add("control", f"honest GET {t} with A's bearer token", get(t, BEARER_A))
    c.add("control", "no credentials: 401", get("/api/me"))
    c.add("control", "B's own school with B's cookie",
          get("/api/addressbook/persons?schoolId=@SCHOOL_B@&page=1&pageSize=20",
              "Cookie: skolsid=@SID_B@"))
    c.add("control", "unknown path with A's cookie: 404", get("/api/nothing", COOKIE_A))
    c.add("control", "HEAD of /api/me", get("/api/me", COOKIE_A, method="HEAD"))
    body = '{"echo":1}'
    c.add("control", "POST with Content-Length",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Content-Type: application/json",
                           f"Content-Length: {len(body)}"), body=body))
    c.add("control", "keep-alive, two requests on one connection (the second closes)",
          head("GET /api/me HTTP/1.1", std_headers(COOKIE_A, close=False))
          + get("/api/addressbook/persons/@PERSON_B@", COOKIE_A))


def gen_request_line_ws(c):
    forms = [
        ("two spaces after the method", "GET  {t} HTTP/1.1"),
        ("two spaces before the version", "GET {t}  HTTP/1.1"),
        ("three spaces after the method", "GET   {t} HTTP/1.1"),
        ("tab after the method", "GET\t{t} HTTP/1.1"),
        ("tab before the version", "GET {t}\tHTTP/1.1"),
        ("trailing space after the version", "GET {t} HTTP/1.1 "),
        ("space and tab", "GET \t{t} HTTP/1.1"),
    ]
    for note, form in forms:
        for t in c.pick(TARGETS, 3):
            c.add("reqline-ws", note, head(form.format(t=t), std_headers(COOKIE_A)))
    c.add("reqline-ws", "empty line before the request line",
          CRLF + get("/api/me", COOKIE_A))
    c.add("reqline-ws", "two empty lines before the request line",
          CRLF + CRLF + get("/api/addressbook/persons/@PERSON_B@", COOKIE_A))


def gen_method_case(c):
    for m in ["get", "Get", "gEt", "GEt"]:
        for t in c.pick(TARGETS, 2):
            c.add("method-case", f"method {m!r}", get(t, COOKIE_A, method=m))
    c.add("method-case", "POST to a GET route", get("/api/me", COOKIE_A, method="POST"))
    c.add("method-case", "unknown method", get("/api/me", COOKIE_A, method="FETCH"))


def gen_absolute_form(c):
    for t in c.pick(TARGETS, 3):
        c.add("absolute-form", "https absolute-form", get(f"https://@HOST@{t}", COOKIE_A))
    c.add("absolute-form", "http scheme", get("http://@HOST@/api/me", COOKIE_A))
    c.add("absolute-form", "upper-case scheme and host",
          get("HTTPS://LOCALHOST/api/addressbook/persons/@PERSON_B@", COOKIE_A))
    c.add("absolute-form", "authority differs from Host",
          get("https://other.example/api/addressbook/persons/@PERSON_B@", COOKIE_A))
    c.add("absolute-form", "absolute-form with a port",
          get("https://localhost:443/api/me", COOKIE_A))
    c.add("absolute-form", "absolute-form without a path", get("https://@HOST@", COOKIE_A))


def gen_http10(c):
    for t in c.pick(TARGETS, 3):
        c.add("http10", "HTTP/1.0 with Host",
              head(f"GET {t} HTTP/1.0", ["Host: @HOST@", "X-Request-Id: @RID@", COOKIE_A]))
    c.add("http10", "HTTP/1.0 without Host",
          head("GET /api/addressbook/persons/@PERSON_B@ HTTP/1.0",
               ["X-Request-Id: @RID@", COOKIE_A]))
    c.add("http10", "HTTP/1.0 keep-alive then close",
          head("GET /api/me HTTP/1.0", ["Host: @HOST@", "X-Request-Id: @RID@", COOKIE_A,
                                        "Connection: keep-alive"])
          + head("GET /api/me HTTP/1.0", ["Host: @HOST@", "X-Request-Id: @RID@", COOKIE_A]))
    c.add("http10", "lower-case version", get("/api/me", COOKIE_A, version="http/1.1"))
    c.add("http10", "version HTTP/1.2", get("/api/me", COOKIE_A, version="HTTP/1.2"))
    c.add("http10", "version HTTP/2.0 in an HTTP/1 request line",
          get("/api/me", COOKIE_A, version="HTTP/2.0"))
    c.add("http10", "version with leading zero", get("/api/me", COOKIE_A, version="HTTP/01.1"))


def gen_bare_lf(c):
    for t in c.pick(TARGETS, 4):
        c.add("bare-lf", "every line ended by LF",
              head(f"GET {t} HTTP/1.1", std_headers(COOKIE_A), eol="\n"))
    c.add("bare-lf", "request line CRLF, headers LF",
          f"GET /api/me HTTP/1.1\r\n" + "".join(h + "\n" for h in std_headers(COOKIE_A)) + "\n")
    c.add("bare-lf", "only the cookie line ended by LF",
          "GET /api/addressbook/persons/@PERSON_B@ HTTP/1.1\r\nHost: @HOST@\r\n"
          "X-Request-Id: @RID@\r\nCookie: skolsid=@SID_A@\nConnection: close\r\n\r\n")
    c.add("bare-lf", "headers CRLF, end of head LF",
          "GET /api/me HTTP/1.1\r\n" + "".join(h + "\r\n" for h in std_headers(COOKIE_A))
          + "\n")
    c.add("bare-lf", "bare CR inside the head",
          "GET /api/me HTTP/1.1\r\nHost: @HOST@\r\nX-Request-Id: @RID@\r\nX-A: 1\rX-B: 2\r\n"
          "Cookie: skolsid=@SID_A@\r\nConnection: close\r\n\r\n")


def gen_header_case(c):
    names = ["cookie", "COOKIE", "CoOkIe", "cOOKIE"]
    for n in names:
        t = c.pick(TARGETS, 1)[0]
        c.add("header-case", f"cookie header named {n!r}", get(t, f"{n}: skolsid=@SID_A@"))
    for n, scheme in [("authorization", "Bearer"), ("AUTHORIZATION", "Bearer"),
                      ("Authorization", "bearer"), ("Authorization", "BEARER"),
                      ("aUtHoRiZaTiOn", "bEaReR")]:
        t = c.pick(TARGETS, 1)[0]
        c.add("header-case", f"{n}: {scheme}", get(t, f"{n}: {scheme} @JWT_A@"))
    c.add("header-case", "cookie name in capitals (cookie names are case-sensitive)",
          get("/api/me", "Cookie: SKOLSID=@SID_A@"))


def gen_control_bytes(c):
    for b in [0x01, 0x02, 0x08, 0x0b, 0x0c, 0x1b, 0x1f, 0x7f, 0x80, 0xff]:
        ch = chr(b)
        t = c.pick(TARGETS, 1)[0]
        c.add("ctl-bytes", f"\\x{b:02x} in a cookie before the session",
              get(t, f"Cookie: x={ch}; skolsid=@SID_A@"))
        c.add("ctl-bytes", f"\\x{b:02x} in a cookie after the session",
              get(t, f"Cookie: skolsid=@SID_A@; y=a{ch}b"))
        if b in (0x01, 0x1f, 0x7f):
            c.add("ctl-bytes", f"\\x{b:02x} in another header",
                  get(t, f"X-Note: a{ch}b", COOKIE_A))
    c.add("ctl-bytes", "NUL in a cookie before the session",
          get("/api/me", "Cookie: x=\x00; skolsid=@SID_A@"))
    c.add("ctl-bytes", "tab inside the cookie header",
          get("/api/addressbook/persons/@PERSON_B@", "Cookie:\tx=1;\tskolsid=@SID_A@"))
    c.add("ctl-bytes", "session value ended by \\x1f",
          get("/api/me", "Cookie: skolsid=@SID_A@\x1f"))
    c.add("ctl-bytes", "bearer token ended by \\x1f",
          get("/api/addressbook/persons/@PERSON_B@", "Authorization: Bearer @JWT_A@\x1f"))
    c.add("ctl-bytes", "bearer token ended by a vertical tab",
          get("/api/me", "Authorization: Bearer @JWT_A@\x0b"))


def gen_obs_fold(c):
    c.add("obs-fold", "cookie folded before the session",
          get("/api/me", "Cookie: x=1;\r\n skolsid=@SID_A@"))
    c.add("obs-fold", "cookie folded with a tab",
          get("/api/addressbook/persons/@PERSON_B@", "Cookie: x=1;\r\n\tskolsid=@SID_A@"))
    c.add("obs-fold", "another header folded before the cookie",
          get("/api/addressbook/search?q=Al", "X-Long: a\r\n b", COOKIE_A))
    c.add("obs-fold", "authorization folded after the scheme",
          get("/api/me", "Authorization: Bearer\r\n @JWT_A@"))
    c.add("obs-fold", "fold right after the request line",
          head("GET /api/me HTTP/1.1", [" X-Folded: 1"] + std_headers(COOKIE_A)))
    c.add("obs-fold", "empty continuation line",
          get("/api/me", "X-Long: a\r\n \r\n b", COOKIE_A))


def gen_invalid_names(c):
    for n in ["X_Forwarded_For: 10.9.9.9", "Sess_Ion: 1", "X-Cookie_: skolsid=@SID_B@",
              "Cookie_: skolsid=@SID_B@"]:
        t = c.pick(TARGETS, 1)[0]
        c.add("bad-name", f"header {n.split(':')[0]!r}", get(t, n, COOKIE_A))
    c.add("bad-name", "space before the colon of the cookie",
          get("/api/me", "Cookie : skolsid=@SID_A@"))
    c.add("bad-name", "tab before the colon of the cookie",
          get("/api/addressbook/persons/@PERSON_B@", "Cookie\t: skolsid=@SID_A@"))
    c.add("bad-name", "header without a colon before the cookie",
          get("/api/me", "NoColonHere", COOKIE_A))
    c.add("bad-name", "empty header name", get("/api/me", ": x", COOKIE_A))
    c.add("bad-name", "header name with a slash", get("/api/me", "X/Y: 1", COOKIE_A))
    c.add("bad-name", "non-ASCII header name", get("/api/me", "X-\u00e5: 1", COOKIE_A))


def gen_duplicates(c):
    c.add("dup-header", "two Host headers",
          head("GET /api/me HTTP/1.1", ["Host: @HOST@", "Host: other.example",
                                        "X-Request-Id: @RID@", COOKIE_A, "Connection: close"]))
    c.add("dup-header", "two Authorization headers, A's token first",
          get("/api/addressbook/persons/@PERSON_B@", BEARER_A,
              "Authorization: Bearer @FORGED_B@"))
    c.add("dup-header", "two Authorization headers, forged token first",
          get("/api/me", "Authorization: Bearer @FORGED_B@", BEARER_A))
    c.add("dup-header", "two equal Content-Length headers",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Content-Length: 4", "Content-Length: 4"), body="abcd"))
    c.add("dup-header", "two different Content-Length headers",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Content-Length: 4", "Content-Length: 2"), body="abcd"))
    c.add("dup-header", "two X-Forwarded-For headers",
          get("/api/me", "X-Forwarded-For: 10.1.1.1", "X-Forwarded-For: 10.2.2.2", COOKIE_A))
    c.add("dup-header", "Forwarded header naming another client",
          get("/api/me", "Forwarded: for=10.3.3.3", COOKIE_A))


def gen_cookies(c):
    forms = [
        ("two Cookie headers, session in the second", ["Cookie: a=1", COOKIE_A]),
        ("two Cookie headers, session in the first", [COOKIE_A, "Cookie: a=1"]),
        ("A's then B's session in two headers", [COOKIE_A, "Cookie: skolsid=@SID_B@"]),
        ("B's then A's session in two headers", ["Cookie: skolsid=@SID_B@", COOKIE_A]),
        ("A's then B's session in one header", ["Cookie: skolsid=@SID_A@; skolsid=@SID_B@"]),
        ("B's then A's session in one header", ["Cookie: skolsid=@SID_B@; skolsid=@SID_A@"]),
        ("session between other crumbs", ["Cookie: a=1; skolsid=@SID_A@; b=2"]),
        ("crumbs without spaces", ["Cookie: a=1;skolsid=@SID_A@;b=2"]),
        ("session quoted", ['Cookie: skolsid="@SID_A@"']),
        ("spaces around '='", ["Cookie: skolsid = @SID_A@"]),
        ("empty session crumb first", ["Cookie: skolsid=; skolsid=@SID_A@"]),
        ("a bogus session first", ["Cookie: skolsid=00000000000000000000000000000000; "
                                   "skolsid=@SID_A@"]),
        ("comma-separated crumbs", ["Cookie: a=1, skolsid=@SID_A@"]),
        ("three Cookie headers", ["Cookie: a=1", "Cookie: b=2", COOKIE_A]),
        ("empty Cookie header then the session", ["Cookie:", COOKIE_A]),
        ("session with a trailing ';'", ["Cookie: skolsid=@SID_A@;"]),
        ("similar name before the session", ["Cookie: xskolsid=@SID_B@; skolsid=@SID_A@"]),
        ("B's cookie and A's bearer token", ["Cookie: skolsid=@SID_B@", BEARER_A]),
        ("A's cookie and a forged bearer for B", [COOKIE_A, "Authorization: Bearer @FORGED_B@"]),
    ]
    for note, hs in forms:
        for t in c.pick(TARGETS, 2):
            c.add("cookies", note, get(t, *hs))


def gen_bearer(c):
    forms = [
        ("two spaces after Bearer", "Authorization: Bearer  @JWT_A@"),
        ("tab after Bearer", "Authorization: Bearer\t@JWT_A@"),
        ("trailing spaces", "Authorization: Bearer @JWT_A@   "),
        ("no space after Bearer", "Authorization: Bearer@JWT_A@"),
        ("forged unsigned token naming B", "Authorization: Bearer @FORGED_B@"),
        ("Basic scheme", "Authorization: Basic cDEwMDE6eA=="),
        ("empty bearer", "Authorization: Bearer "),
        ("token with a trailing dot", "Authorization: Bearer @JWT_A@."),
    ]
    for note, h in forms:
        for t in c.pick(TARGETS, 2):
            c.add("bearer", note, get(t, h))
    c.add("bearer", "Basic scheme with A's cookie",
          get("/api/addressbook/persons/@PERSON_B@", "Authorization: Basic eDp5", COOKIE_A))
    c.add("bearer", "broken bearer with A's cookie (the platform refuses)",
          get("/api/me", "Authorization: Bearer x.y.z", COOKIE_A))


def chunk(data, ext=""):
    return f"{len(data):x}{ext}\r\n{data}\r\n"


def gen_framing(c):
    body = "abcde"
    chunked = chunk(body) + "0\r\n\r\n"
    t = "/api/addressbook/persons/@PERSON_B@"
    c.add("te-cl", "chunked and Content-Length",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Transfer-Encoding: chunked", "Content-Length: 3"),
               body=chunked))
    c.add("te-cl", "Content-Length before chunked",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Content-Length: 3", "Transfer-Encoding: chunked"),
               body=chunked))
    c.add("te-cl", "Transfer-Encoding: Chunked (case)",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Transfer-Encoding: Chunked"), body=chunked))
    c.add("te-cl", "Transfer-Encoding: identity, chunked",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Transfer-Encoding: identity, chunked"), body=chunked))
    c.add("te-cl", "Transfer-Encoding: xchunked",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Transfer-Encoding: xchunked", "Content-Length: 5"),
               body=body))
    c.add("te-cl", "two Transfer-Encoding headers",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Transfer-Encoding: chunked", "Transfer-Encoding: identity"),
               body=chunked))
    c.add("te-cl", "Transfer-Encoding with a space before the colon",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Transfer-Encoding : chunked", "Content-Length: 5"),
               body=body))
    c.add("te-cl", "Content-Length with a plus sign",
          head("POST /api/test/echo HTTP/1.1", std_headers(COOKIE_A, "Content-Length: +5"),
               body=body))
    c.add("te-cl", "Content-Length list '5, 5'",
          head("POST /api/test/echo HTTP/1.1", std_headers(COOKIE_A, "Content-Length: 5, 5"),
               body=body))
    smuggled = ("GET /api/addressbook/persons/@PERSON_B@ HTTP/1.1\r\nHost: @HOST@\r\n"
                "X-Request-Id: @RID@-smuggled\r\nCookie: skolsid=@SID_A@\r\n\r\n")
    c.add("te-cl", "CL.TE: a request hidden in a chunked body",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, f"Content-Length: {len('0' + CRLF + CRLF + smuggled)}",
                           "Transfer-Encoding: chunked"),
               body="0\r\n\r\n" + smuggled))
    c.add("te-cl", "GET with chunked and Content-Length",
          head(f"GET {t} HTTP/1.1",
               std_headers(COOKIE_A, "Transfer-Encoding: chunked", "Content-Length: 10"),
               body=chunked))
    c.add("te-cl", "GET with a Content-Length body",
          head(f"GET {t} HTTP/1.1", std_headers(COOKIE_A, "Content-Length: 5"), body=body))


def gen_chunked(c):
    t = "/api/addressbook/persons/@PERSON_B@"
    c.add("chunked", "chunk extensions",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Transfer-Encoding: chunked"),
               body=chunk("abc", ";ext=1") + chunk("de", ';q="x"') + "0;last\r\n\r\n"))
    c.add("chunked", "a harmless trailer",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Transfer-Encoding: chunked", "Trailer: X-Sum"),
               body=chunk("abc") + "0\r\nX-Sum: 1\r\n\r\n"))
    for target in ["/api/me", t, "/api/addressbook/persons?schoolId=@SCHOOL_B@&page=1"]:
        c.add("chunked", "GET with an Authorization trailer naming B (forged)",
              head(f"GET {target} HTTP/1.1",
                   std_headers(COOKIE_A, "Transfer-Encoding: chunked"),
                   body=chunk("x") + "0\r\nAuthorization: Bearer @FORGED_B@\r\n\r\n"))
    c.add("chunked", "GET with a Cookie trailer of B",
          head(f"GET {t} HTTP/1.1", std_headers(COOKIE_A, "Transfer-Encoding: chunked"),
               body="0\r\nCookie: skolsid=@SID_B@\r\n\r\n"))
    c.add("chunked", "GET without credentials and an Authorization trailer of A",
          head("GET /api/me HTTP/1.1", std_headers("Transfer-Encoding: chunked"),
               body="0\r\nAuthorization: Bearer @JWT_A@\r\n\r\n"))
    c.add("chunked", "chunk sizes in upper-case hex with leading zeros",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Transfer-Encoding: chunked"),
               body="000A\r\n0123456789\r\n0\r\n\r\n"))
    c.add("chunked", "chunk size with trailing whitespace",
          head("POST /api/test/echo HTTP/1.1",
               std_headers(COOKIE_A, "Transfer-Encoding: chunked"),
               body="5 \r\nabcde\r\n0\r\n\r\n"))


def pad_headers(total, line=1000):
    out, i = [], 0
    while total > 0:
        n = min(line, total)
        out.append(f"X-Pad-{i:03d}: " + "p" * max(1, n - 14))
        total -= n
        i += 1
    return out


def gen_padded(c):
    for kb in (6, 30):
        for t in c.pick(TARGETS, 2):
            c.add("padded", f"{kb} KB of headers before the cookie",
                  get(t, *pad_headers(kb * 1024), COOKIE_A))
        c.add("padded", f"{kb} KB of headers before the bearer token",
              get("/api/addressbook/persons/@PERSON_B@", *pad_headers(kb * 1024), BEARER_A))
    c.add("padded", "one 6 KB header before the cookie",
          get("/api/me", "X-Big: " + "b" * 6144, COOKIE_A))
    c.add("padded", "6 KB of crumbs before the session in one cookie header",
          get("/api/addressbook/persons/@PERSON_B@",
              "Cookie: " + "; ".join(f"c{i}={'v' * 40}" for i in range(140))
              + "; skolsid=@SID_A@"))
    c.add("padded", "12 KB in one header (beyond nginx's 8k buffer)",
          get("/api/me", "X-Big: " + "b" * 12288, COOKIE_A))


def gen_paths(c):
    forms = [
        ("percent-encoded letter", "/api/%61ddressbook/persons/@PERSON_B@"),
        ("percent-encoded letter, query route",
         "/api/%61ddressbook/persons?schoolId=@SCHOOL_B@&page=1"),
        ("percent-encoded last letter", "/api/addressbook/person%73/@PERSON_B@"),
        ("every letter encoded", "/%61%70%69/%6d%65"),
        ("upper-case hex", "/api/%4De"),
        ("encoded slash", "/api/addressbook%2Fpersons/@PERSON_B@"),
        ("double encoding", "/api/%2561ddressbook/persons/@PERSON_B@"),
        ("encoded digit in the id", "/api/addressbook/persons/%31@PERSON_B_TAIL@"),
        ("invalid escape", "/api/me%zz"),
        ("encoded NUL", "/api/me%00"),
        ("UTF-8 in the path", "/api/addressbook/search?q=%C3%85s"),
    ]
    for note, p in forms:
        c.add("pct-path", note, get(p, COOKIE_A))
    dots = [
        ("dot-dot back into the API", "/api/x/../addressbook/persons/@PERSON_B@"),
        ("single dot", "/api/./me"),
        ("single dot before the id", "/api/addressbook/persons/./@PERSON_B@"),
        ("encoded dot-dot", "/api/x/%2e%2e/addressbook/persons/@PERSON_B@"),
        ("dot-dot at the end", "/api/me/x/.."),
        ("dot-dot above the root", "/../api/me"),
        ("dot-dot in a query route", "/api/addressbook/x/../persons?schoolId=@SCHOOL_B@"),
    ]
    for note, p in dots:
        c.add("dot-path", note, get(p, COOKIE_A))
    slashes = [
        ("leading //", "//api/me"),
        ("// inside", "/api//addressbook/persons/@PERSON_B@"),
        ("// before the id", "/api/addressbook/persons//@PERSON_B@"),
        ("trailing /", "/api/me/"),
        ("/// inside a query route", "/api///addressbook/persons?schoolId=@SCHOOL_B@"),
    ]
    for note, p in slashes:
        c.add("slash-path", note, get(p, COOKIE_A))
    params = [
        ("';' parameter on the last segment", "/api/me;x=1"),
        ("';' jsessionid on a query route",
         "/api/addressbook/persons;jsessionid=1?schoolId=@SCHOOL_B@"),
        ("';' parameter on the id", "/api/addressbook/persons/@PERSON_B@;a"),
        ("';' parameter on a middle segment", "/api/addressbook;v=2/persons/@PERSON_B@"),
    ]
    for note, p in params:
        c.add("semi-path", note, get(p, COOKIE_A))
    qs = [
        ("schoolId twice, own first", "schoolId=@SCHOOL_A@&schoolId=@SCHOOL_B@"),
        ("schoolId twice, other first", "schoolId=@SCHOOL_B@&schoolId=@SCHOOL_A@"),
        ("schoolid in lower case", "schoolid=@SCHOOL_B@"),
        ("schoolId percent-encoded", "schoolId=%73ch-02"),
        ("schoolId name percent-encoded", "%73choolId=@SCHOOL_B@"),
        ("pageSize twice", "schoolId=@SCHOOL_A@&pageSize=10&pageSize=100"),
        ("schoolId with brackets", "schoolId[]=@SCHOOL_B@"),
        ("empty schoolId then other", "schoolId=&schoolId=@SCHOOL_B@"),
        ("';' as a query separator", "schoolId=@SCHOOL_A@;schoolId=@SCHOOL_B@"),
    ]
    for note, q in qs:
        c.add("query-dup", note, get(f"/api/addressbook/persons?{q}", COOKIE_A))


def generate(seed):
    c = Corpus(seed)
    for g in (gen_controls, gen_request_line_ws, gen_method_case, gen_absolute_form,
              gen_http10, gen_bare_lf, gen_header_case, gen_control_bytes, gen_obs_fold,
              gen_invalid_names, gen_duplicates, gen_cookies, gen_bearer, gen_framing,
              gen_chunked, gen_padded, gen_paths):
        g(c)
    return c.cases


def cmd_generate(args):
    cases = generate(args.seed)
    with open(args.out, "w", encoding="ascii", newline="\n") as f:
        for case in cases:
            f.write(json.dumps(case, ensure_ascii=True, separators=(",", ":")) + "\n")
    print(json.dumps({"cases": len(cases)}))


# ---------------------------------------------------------------------------------------------
# login and send
# ---------------------------------------------------------------------------------------------

def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tls_context(cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def https(port, cafile, method, path, body=None, headers=None):
    req = urllib.request.Request(f"https://localhost:{port}{path}", data=body, method=method,
                                 headers=headers or {})
    with urllib.request.urlopen(req, context=tls_context(cafile), timeout=10) as r:
        return r.status, dict(r.headers), r.read()


def cmd_login(args):
    with open(args.data, encoding="utf-8") as f:
        ds = json.load(f)
    pupils = [a for a in ds["accounts"] if a["role"] == "pupil"]
    a = next(p for p in pupils if p["schoolId"] == "sch-01")
    b = next(p for p in pupils if p["schoolId"] == "sch-02")
    sids = {}
    for who, acct in (("A", a), ("B", b)):
        form = urllib.parse.urlencode({"username": acct["username"],
                                       "password": acct["password"]}).encode()
        status, hdrs, _ = https(args.port, args.cafile, "POST", "/login", form,
                                {"Content-Type": "application/x-www-form-urlencoded"})
        cookie = hdrs.get("Set-Cookie", "")
        if status != 200 or not cookie.startswith("skolsid="):
            sys.exit(f"login of {who} failed: {status} {cookie!r}")
        sids[who] = cookie.split(";")[0].split("=", 1)[1]
    form = json.dumps({"username": a["username"], "password": a["password"]}).encode()
    status, _, body = https(args.port, args.cafile, "POST", "/api/token", form,
                            {"Content-Type": "application/json"})
    if status != 200:
        sys.exit(f"token for A failed: {status}")
    jwt_a = json.loads(body)["access_token"]
    forged = (b64(json.dumps({"alg": "none", "typ": "JWT"}).encode()) + "."
              + b64(json.dumps({"sub": str(b["userId"]), "school": b["schoolId"],
                                "role": "admin", "iat": 1, "exp": 4102444800}).encode())
              + ".")
    creds = {
        "HOST": "localhost", "SID_A": sids["A"], "SID_B": sids["B"], "JWT_A": jwt_a,
        "FORGED_B": forged, "SCHOOL_A": a["schoolId"], "SCHOOL_B": b["schoolId"],
        "PERSON_A": str(a["userId"]), "PERSON_B": str(b["userId"]),
        "PERSON_B_TAIL": str(b["userId"])[1:],
        "USER_A": a["userId"], "USER_B": b["userId"],
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(creds, f, indent=1)
    print(json.dumps({"user_a": a["userId"], "user_b": b["userId"]}))


def fill(raw, creds, rid):
    out = raw.replace("@RID@", rid)
    # Longest names first: @PERSON_B_TAIL@ before @PERSON_B@.
    for k in sorted(creds, key=len, reverse=True):
        out = out.replace(f"@{k}@", str(creds[k]))
    return out.encode("latin-1")


def parse_responses(data, method):
    """Statuses of the responses in `data`, in order (interim 1xx left out); the rest unparsed
    is ignored (a response cut short still counts: the server answered)."""
    statuses, pos = [], 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        sep = 4
        if end < 0:
            end, sep = data.find(b"\n\n", pos), 2
        if end < 0:
            break
        lines = data[pos:end].split(b"\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            break
        status = int(parts[1])
        hdrs = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(b":")
            hdrs[k.strip().lower()] = v.strip()
        pos = end + sep
        if 100 <= status < 200:
            continue
        statuses.append(status)
        if method == "HEAD" or status in (204, 304):
            continue
        if hdrs.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                nl = data.find(b"\r\n", pos)
                if nl < 0:
                    return statuses
                size = int(data[pos:nl].split(b";")[0] or b"0", 16)
                pos = nl + 2 + size + 2
                if size == 0:
                    # trailers, if any, end with an empty line; nginx/Apache send none
                    break
        elif b"content-length" in hdrs:
            pos += int(hdrs[b"content-length"])
        else:
            break  # body until close
        # A method for the next response on this connection: the requests' own order.
        method = "GET"
    return statuses


def send_one(case, creds, port, cafile, timeout, rid_prefix):
    raw = fill(case["raw"], creds, rid_prefix + case["id"])
    method = case["raw"].split(" ", 1)[0].strip().upper()
    out = {"id": case["id"], "family": case["family"], "sent": len(raw)}
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as e:
        out["error"] = f"connect: {e}"
        return out
    out["local_port"] = sock.getsockname()[1]
    data = b""
    try:
        tls = tls_context(cafile).wrap_socket(sock, server_hostname="localhost")
        tls.settimeout(timeout)
        tls.sendall(raw)
        while True:
            chunk_ = tls.recv(65536)
            if not chunk_:
                break
            data += chunk_
    except (socket.timeout, TimeoutError):
        out["timeout"] = True
    except (ssl.SSLError, OSError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        sock.close()
    out["received"] = len(data)
    out["statuses"] = parse_responses(data, method)
    return out


def cmd_send(args):
    with open(args.corpus, encoding="ascii") as f:
        cases = [json.loads(line) for line in f if line.strip()]
    if args.ids_from:
        with open(args.ids_from, encoding="ascii") as f:
            want = {line.strip() for line in f if line.strip()}
        cases = [c for c in cases if c["id"] in want]
    with open(args.creds, encoding="utf-8") as f:
        creds = json.load(f)
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as ex:
        results = list(ex.map(lambda c: send_one(c, creds, args.port, args.cafile,
                                                 args.timeout, args.rid_prefix), cases))
    with open(args.out, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    print(json.dumps({"sent": len(results),
                      "answered": sum(1 for r in results if r.get("statuses"))}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--seed", type=int, default=12)
    g.add_argument("--out", required=True)
    lg = sub.add_parser("login")
    lg.add_argument("--port", type=int, required=True)
    lg.add_argument("--cafile", required=True)
    lg.add_argument("--data", required=True)
    lg.add_argument("--out", required=True)
    s = sub.add_parser("send")
    s.add_argument("--corpus", required=True)
    s.add_argument("--creds", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--cafile", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--ids-from")
    s.add_argument("--rid-prefix", default="",
                   help="X-Request-Id is this prefix + the case id (tells the edges apart)")
    s.add_argument("--parallel", type=int, default=12)
    s.add_argument("--timeout", type=float, default=1.5)
    args = ap.parse_args(argv)
    return {"generate": cmd_generate, "login": cmd_login, "send": cmd_send}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
