#!/usr/bin/env python3
"""Skolportalen: a synthetic school platform with an address-book API.

This is the demo application that the Spårbar agent watches (through nginx's
OpenSSL and the app's own sockets).  It models the 2021 incident in which a
pupil harvested the address book of a municipal school platform by changing a
schoolId parameter that the server never checked against the caller.

Python 3.11 standard library only.  ALL DATA IS SYNTHETIC: names are random
combinations of common Swedish first names and surnames, e-mail addresses use
the reserved example domains (RFC 2606: *.example, example.net/org/com) and
phone numbers are drawn from the number ranges the Swedish regulator PTS sets
aside for use in fiction (so phone numbers repeat across persons; ids and
e-mails are unique).

Usage
-----
    python3 app.py --port 8081 [--host 127.0.0.1] [--tls-cert C --tls-key K]
                   [--vulnerable] [--seed 7] [--dump-data FILE] [--record FILE]
                   [--verbose]

Prints ``READY <port>`` (flushed) on stdout once listening.  SIGTERM/SIGINT
exit cleanly (status 0).  With --tls-cert/--tls-key the app terminates TLS
itself with the ``ssl`` module (the "CPython ssl server" of the tests).
With --record FILE it appends one JSON line per request it answered: what it
received and whom it authenticated (see Handler._record; the differential suite
tests/tests/differential.rs compares the agent's records with these lines).
With --dump-data it writes the whole dataset (persons, accounts with
passwords, schools, classes, municipalities, the JWT secret) as JSON and exits.

Data model (deterministic from --seed)
--------------------------------------
3 municipalities, 8 schools ``sch-01``..``sch-08`` (F-6 or 7-9), 5-7 classes
per school (``cls-01-7a`` = class "7A" of sch-01), 20-26 pupils per class,
households of 1-3 siblings (same school, different classes) with 1-2
guardians, and per school one principal, 1-2 admins, one mentor teacher per
class and 2-4 subject teachers.  Person ids are sequential integers starting
at 1001, contiguous per school (so enumeration walks across schools).  Every
person has an account: username ``p<id>``, password
``pw-<id>-<seed>-<6 hex>`` (hex = sha256 of "<seed>:<id>"), see --dump-data.

Access rules ("scope school" = the school whose data is being listed/read)
---------------------------------------------------------------------------
* /api/* needs a session cookie ``skolsid`` (POST /login) or
  ``Authorization: Bearer <jwt>`` (POST /api/token); otherwise 401.
  As real frameworks do: the path is routed percent-decoded (a WSGI PATH_INFO),
  several Cookie headers are read as one list (RFC 9113 8.2.3; Go, Node), the
  first ``skolsid`` wins, and a bearer header, when present, decides alone.
  /api/test/* needs no authentication.
* visible(caller, person, scope):
      person.schoolId == scope and (
          caller is pupil/teacher/principal/admin            -> whole school
          caller is guardian -> person is staff, or a pupil in one of the
                                guardian's children's classes, or the
                                guardian themself or one of their children)
* Normal mode: scope = the caller's own school.  A request that names another
  school (path or ``schoolId`` query), a class of another school, or a person
  of another school gets 403.  A person (or photo) not visible to the caller
  gets 403.  pageSize must be 1..100 (400 otherwise).
* --vulnerable (the incident's flaw): the server trusts the school named in
  the request: scope = the requested school / the requested class's school /
  the requested person's school.  The role rule above still applies, so a
  pupil or staff account can read every school's full address book; a
  guardian gets the staff of other schools.  pageSize may go up to 1000.
  For the caller's own school both modes behave identically.
* Lists are sorted by (lastName, firstName, id) and paginated (page >= 1;
  pages past the end are empty).  ``total`` counts the visible persons.
* A class list holds the class's pupils and its mentor teacher.
* Pupil records embed their guardians' contact data (name, e-mail, phone);
  guardian records embed their children (id, name, class).  So reading a
  pupil's record also discloses the guardians' contact data.

Endpoints
---------
POST /login            form or JSON {username,password} -> {"ok":true,"userId":N}
                       + Set-Cookie skolsid=<32 hex>; 401 on bad credentials
POST /logout           ends the cookie session -> {"ok":true}
POST /api/token        JSON (or form) credentials -> {"access_token","token_type":"Bearer","expires_in"}
                       JWT HS256, claims sub (user id as string), school, role, iat, exp
GET  /api/me           {"id","username","role","schoolId","name"}
GET  /api/addressbook/schools/{schoolId}/persons?page=1&pageSize=50
GET  /api/addressbook/classes/{classId}/persons?page=1&pageSize=50
GET  /api/addressbook/persons?schoolId=..&classId=..&page=..&pageSize=..
     (the real client's variant; schoolId defaults to the caller's school)
GET  /api/addressbook/search?q=..   persons of the caller's school whose first
                       name, last name, full name or nickname starts with q (max 25)
GET  /api/addressbook/persons/{id}         one person (403 / 404)
GET  /api/addressbook/persons/{id}/photo   image/jpeg, 8-40 KiB (404 if no photo)
GET  /api/test/bytes/{n}   exactly n bytes (0..4 MiB), application/octet-stream,
                       byte i = (7*i + (i >> 8)) & 0xFF  (same as node_https.js)
POST /api/test/echo    returns the request body (Content-Type echoed)
Everything else: 404 {"error":"not_found"}.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import signal
import socket
import ssl
import struct
import sys
import time
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import threading
from urllib.parse import parse_qs, unquote, urlsplit

# ---------------------------------------------------------------------------
# Deterministic test bytes (shared definition with tests/servers/node_https.js)
# ---------------------------------------------------------------------------

MAX_TEST_BYTES = 4 * 1024 * 1024
MAX_BODY = 8 * 1024 * 1024
_PERIOD = bytes(((7 * i) + (i >> 8)) & 0xFF for i in range(65536))
TEST_BYTES = memoryview(_PERIOD * (MAX_TEST_BYTES // 65536))


def test_bytes(n):
    """The first n bytes of the deterministic test stream."""
    return TEST_BYTES[:n]


# ---------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------

GIRLS = """Alice Maja Elsa Astrid Wilma Freja Olivia Ebba Alma Agnes Saga Selma
Ella Vera Stella Signe Alva Ester Ines Klara Lilly Elise Tuva Juni Majken
Nova Hedda Greta Ellen Linnea Matilda Ida Emma Julia Hanna Sara Moa Tilda
Felicia Ronja Elvira Nora Hilda Lova Siri Sofia Emilia""".split()
BOYS = """William Noah Hugo Lucas Liam Oliver Elias Adam Matteo Alexander Vincent
Nils Leo Theo Ludvig Charlie Olle Axel Arvid Isak Valter Frans Albin Gustav
Sixten Elton Melvin Love Viggo Harry Edvin Loke Malte Josef Alfred Benjamin
Filip Anton Jonatan Emil Oskar Måns Viktor Sigge Sam Ebbe""".split()
ADULT_F = """Anna Eva Maria Karin Sara Lena Kristina Emma Malin Jenny Linda Helena
Johanna Sofia Camilla Cecilia Åsa Ulrika Therese Frida Ingrid Annika Marie
Susanne Petra Jessica Hanna Elin Madeleine Josefin""".split()
ADULT_M = """Erik Lars Karl Anders Johan Per Mikael Peter Jan Thomas Daniel Fredrik
Magnus Stefan Andreas Jonas Mattias Martin Niklas Henrik Marcus Patrik Björn
Tobias Robert Joakim Christoffer Simon Mats Göran""".split()
SURNAMES = """Andersson Johansson Karlsson Nilsson Eriksson Larsson Olsson Persson
Svensson Gustafsson Pettersson Jonsson Jansson Hansson Bengtsson Jönsson
Lindberg Jakobsson Magnusson Olofsson Lindström Lindqvist Lindgren Berg
Axelsson Bergström Lundberg Lind Lundgren Lundqvist Mattsson Berglund
Fredriksson Sandberg Henriksson Forsberg Sjöberg Wallin Engström Eklund
Danielsson Lundin Håkansson Björk Bergman Gunnarsson Holm Wikström Samuelsson
Isaksson Fransson Bergqvist Nyström Holmberg Arvidsson Löfgren Söderberg
Nyberg Blomqvist Claesson Nordström Mårtensson Lundström Viklund Björklund
Eliasson Pålsson Berggren Sandström Lund Nordin Ström Åberg Hermansson
Ekström Holmgren Sundberg Hedlund Dahlberg Hellström Sjögren Abrahamsson
Falk Öberg Blom Ek Månsson Åkesson Strand Hedberg Sundqvist""".split()
SUBJECTS = ["svenska", "matematik", "engelska", "idrott och hälsa", "bild",
            "musik", "slöjd", "NO", "SO", "teknik", "moderna språk", "hemkunskap"]
MUNICIPALITIES = [
    ("mun-1", "Norrviks kommun", "norrvik.example"),
    ("mun-2", "Sjöbacka kommun", "sjobacka.example"),
    ("mun-3", "Ekdala kommun", "ekdala.example"),
]
SCHOOLS = [  # id, name, municipality, stage
    ("sch-01", "Björkängsskolan", "mun-1", "F-6"),
    ("sch-02", "Lindhagaskolan", "mun-1", "7-9"),
    ("sch-03", "Ekbackens skola", "mun-1", "F-6"),
    ("sch-04", "Solrosskolan", "mun-2", "F-6"),
    ("sch-05", "Granhöjdens skola", "mun-2", "7-9"),
    ("sch-06", "Sjöviksskolan", "mun-2", "F-6"),
    ("sch-07", "Tallbackaskolan", "mun-3", "7-9"),
    ("sch-08", "Rönnbergsskolan", "mun-3", "F-6"),
]
# Number ranges reserved by PTS for fiction (film, books, demos).
FICTION_PHONES = (
    ["070-174 06 %02d" % n for n in range(5, 100)]
    + ["08-465 004 %02d" % n for n in range(0, 100)]
    + ["031-390 06 %02d" % n for n in range(0, 100)]
    + ["040-628 04 %02d" % n for n in range(0, 100)]
    + ["0980-319 2%02d" % n for n in range(0, 100)]
)
GUARDIAN_MAIL = ["example.net", "example.org", "example.com", "mail.example"]
NICK_SUFFIX = ["an", "is", "e", "y", "sa", "ppe", "ki", "x", "lo", "ja"]
STAFF_ROLES = ("teacher", "principal", "admin")
ROLES = ("pupil", "guardian") + STAFF_ROLES

_ASCII = str.maketrans({"å": "a", "ä": "a", "ö": "o", "é": "e", "ü": "u",
                        "Å": "a", "Ä": "a", "Ö": "o", "É": "e", " ": ""})


def _slug(s):
    return s.lower().translate(_ASCII)


def password_for(pid, seed):
    h = hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()[:6]
    return f"pw-{pid}-{seed}-{h}"


def jwt_secret_for(seed):
    return hashlib.sha256(f"skolportalen-jwt-{seed}".encode()).hexdigest()


def generate(seed=7):
    """Build the whole synthetic dataset deterministically from the seed."""
    rng = random.Random(f"skolportalen:{seed}")
    phones = list(FICTION_PHONES)
    rng.shuffle(phones)
    muns = [{"id": m, "name": n, "domain": d} for m, n, d in MUNICIPALITIES]
    mun_by_id = {m["id"]: m for m in muns}
    persons, schools, classes = [], [], []
    used_emails = set()
    next_id = [1001]

    def email(first, last, domain):
        base = f"{_slug(first)}.{_slug(last)}"
        cand, k = f"{base}@{domain}", 2
        while cand in used_emails:
            cand, k = f"{base}{k}@{domain}", k + 1
        used_emails.add(cand)
        return cand

    def new_person(school, role, first, last, mail_domain, **extra):
        pid = next_id[0]
        next_id[0] += 1
        p = {
            "id": pid, "schoolId": school["id"], "role": role,
            "firstName": first, "lastName": last, "name": f"{first} {last}",
            "email": email(first, last, mail_domain),
            "phone": phones[(pid - 1001) % len(phones)],
            "hasPhoto": rng.random() < (0.8 if role in STAFF_ROLES else
                                        0.7 if role == "pupil" else 0.35),
            "username": f"p{pid}",
        }
        p.update(extra)
        persons.append(p)
        return p

    for sid, sname, mid, stage in SCHOOLS:
        mun = mun_by_id[mid]
        school = {"id": sid, "name": sname, "municipalityId": mid,
                  "municipality": mun["name"], "stage": stage, "classIds": []}
        schools.append(school)
        n_classes = rng.randint(5, 7)
        grades = list(range(1, 7)) if stage == "F-6" else [7, 8, 9]
        labels = []
        per_grade = -(-n_classes // len(grades))
        for g in grades:
            for letter in "ABC"[:per_grade]:
                labels.append(f"{g}{letter}")
        labels = sorted(rng.sample(labels, n_classes),
                        key=lambda s: (int(s[:-1]), s[-1]))
        cls_list = []
        for lab in labels:
            cid = f"cls-{sid[4:]}-{lab.lower()}"
            c = {"id": cid, "name": lab, "schoolId": sid, "grade": int(lab[:-1]),
                 "mentorId": None, "pupilIds": [], "capacity": rng.randint(20, 26)}
            cls_list.append(c)
            classes.append(c)
            school["classIds"].append(cid)
        staff_domain = mun["domain"]
        pupil_domain = f"elev.{mun['domain']}"
        # staff
        fnames = lambda: rng.choice(ADULT_F + ADULT_M)  # noqa: E731
        new_person(school, "principal", fnames(), rng.choice(SURNAMES),
                   staff_domain, title="Rektor")
        for _ in range(rng.randint(1, 2)):
            new_person(school, "admin", fnames(), rng.choice(SURNAMES),
                       staff_domain, title="Skoladministratör")
        for c in cls_list:
            t = new_person(school, "teacher", fnames(), rng.choice(SURNAMES),
                           staff_domain, title="Lärare",
                           subjects=sorted(rng.sample(SUBJECTS, 2)),
                           classId=c["id"], **{"class": c["name"]})
            c["mentorId"] = t["id"]
        for _ in range(rng.randint(2, 4)):
            new_person(school, "teacher", fnames(), rng.choice(SURNAMES),
                       staff_domain, title="Lärare",
                       subjects=sorted(rng.sample(SUBJECTS, 2)))
        # households: siblings in distinct classes of the same school
        free = {c["id"]: c["capacity"] for c in cls_list}
        by_id = {c["id"]: c for c in cls_list}
        while any(free.values()):
            open_ids = [cid for cid, n in free.items() if n > 0]
            k = rng.choices([1, 2, 3], weights=[50, 35, 15])[0]
            k = min(k, len(open_ids))
            kids_cls = rng.sample(open_ids, k)
            surname = rng.choice(SURNAMES)
            kids = []
            for cid in kids_cls:
                free[cid] -= 1
                girl = rng.random() < 0.5
                first = rng.choice(GIRLS if girl else BOYS)
                while any(first == x["firstName"] for x in kids):
                    first = rng.choice(GIRLS if girl else BOYS)
                nick = first[:rng.randint(2, 3)] + rng.choice(NICK_SUFFIX)
                c = by_id[cid]
                kid = new_person(school, "pupil", first, surname, pupil_domain,
                                 nickname=nick.capitalize(), classId=cid,
                                 guardianIds=[], **{"class": c["name"]})
                c["pupilIds"].append(kid["id"])
                kids.append(kid)
            n_g = 1 if rng.random() < 0.4 else 2
            relations = rng.sample(["mamma", "pappa"], 2)
            for gi in range(n_g):
                rel = relations[gi] if rng.random() < 0.9 else "vårdnadshavare"
                first = rng.choice(ADULT_F if relations[gi] == "mamma" else ADULT_M)
                last = surname if rng.random() < 0.75 else rng.choice(SURNAMES)
                g = new_person(school, "guardian", first, last,
                               rng.choice(GUARDIAN_MAIL), relation=rel,
                               childIds=[x["id"] for x in kids])
                for kid in kids:
                    kid["guardianIds"].append(g["id"])
        for c in cls_list:
            del c["capacity"]
    for s in schools:
        ids = [p["id"] for p in persons if p["schoolId"] == s["id"]]
        s["personIdRange"] = [min(ids), max(ids)]
        s["personCount"] = len(ids)
    accounts = [{"userId": p["id"], "username": p["username"],
                 "password": password_for(p["id"], seed), "role": p["role"],
                 "schoolId": p["schoolId"]} for p in persons]
    counts = {"persons": len(persons), "schools": len(schools),
              "classes": len(classes), "municipalities": len(muns)}
    for r in ROLES:
        counts[r] = sum(1 for p in persons if p["role"] == r)
    return {
        "generator": "skolportalen/1", "seed": seed, "counts": counts,
        "municipalities": muns, "schools": schools, "classes": classes,
        "persons": persons, "accounts": accounts,
        "secrets": {"jwtSecret": jwt_secret_for(seed),
                    "passwordScheme": "pw-<id>-<seed>-<sha256('<seed>:<id>')[:6]>"},
    }


class Store:
    """Indexes over the dataset plus the pre-rendered public person JSON."""

    def __init__(self, data, vulnerable):
        self.data = data
        self.seed = data["seed"]
        self.vulnerable = vulnerable
        self.persons = {p["id"]: p for p in data["persons"]}
        self.schools = {s["id"]: s for s in data["schools"]}
        self.classes = {c["id"]: c for c in data["classes"]}
        self.accounts = {a["username"]: a for a in data["accounts"]}
        self.jwt_key = data["secrets"]["jwtSecret"].encode()
        key = lambda p: (p["lastName"], p["firstName"], p["id"])  # noqa: E731
        self.school_members = {sid: [] for sid in self.schools}
        for p in sorted(data["persons"], key=key):
            self.school_members[p["schoolId"]].append(p)
        self.class_members = {}
        for c in data["classes"]:
            members = [self.persons[i] for i in c["pupilIds"]]
            if c["mentorId"]:
                members.append(self.persons[c["mentorId"]])
            self.class_members[c["id"]] = sorted(members, key=key)
        # guardian relations
        self.child_classes, self.related = {}, {}
        for p in data["persons"]:
            if p["role"] == "guardian":
                kids = [self.persons[i] for i in p["childIds"]]
                self.child_classes[p["id"]] = {k["classId"] for k in kids}
                self.related[p["id"]] = {p["id"]} | {k["id"] for k in kids}
        self.public_json = {pid: json.dumps(self._public(p), ensure_ascii=False,
                                            separators=(",", ":"))
                            for pid, p in self.persons.items()}

    def _public(self, p):
        out = {"id": p["id"], "name": p["name"], "firstName": p["firstName"],
               "lastName": p["lastName"]}
        if p["role"] == "pupil":
            out["nickname"] = p["nickname"]
        if p.get("classId"):
            out["class"] = p["class"]
            out["classId"] = p["classId"]
        out["role"] = p["role"]
        if p.get("title"):
            out["title"] = p["title"]
        if p.get("subjects"):
            out["subjects"] = p["subjects"]
        out["email"] = p["email"]
        out["phone"] = p["phone"]
        if p["hasPhoto"]:
            out["photoUrl"] = f"/api/addressbook/persons/{p['id']}/photo"
        out["schoolId"] = p["schoolId"]
        out["schoolName"] = self.schools[p["schoolId"]]["name"]
        if p["role"] == "pupil":
            out["guardians"] = [
                {"id": g["id"], "name": g["name"], "relation": g["relation"],
                 "email": g["email"], "phone": g["phone"]}
                for g in (self.persons[i] for i in p["guardianIds"])]
        if p["role"] == "guardian":
            out["children"] = [
                {"id": k["id"], "name": k["name"], "class": k["class"]}
                for k in (self.persons[i] for i in p["childIds"])]
        return out

    def visible(self, caller, person, scope):
        if person["schoolId"] != scope:
            return False
        if caller["role"] != "guardian":
            return True
        return (person["role"] in STAFF_ROLES
                or person["id"] in self.related[caller["id"]]
                or (person["role"] == "pupil"
                    and person["classId"] in self.child_classes[caller["id"]]))

    # -- JWT ---------------------------------------------------------------
    @staticmethod
    def _b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    def make_jwt(self, person, ttl=3600):
        now = int(time.time())
        header = {"alg": "HS256", "typ": "JWT"}
        claims = {"sub": str(person["id"]), "school": person["schoolId"],
                  "role": person["role"], "iat": now, "exp": now + ttl}
        signing = (self._b64(json.dumps(header, separators=(",", ":")).encode()) + "."
                   + self._b64(json.dumps(claims, separators=(",", ":")).encode()))
        sig = hmac.new(self.jwt_key, signing.encode(), hashlib.sha256).digest()
        return signing + "." + self._b64(sig)

    def check_jwt(self, token):
        try:
            h64, c64, s64 = token.split(".")
            pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
            header = json.loads(base64.urlsafe_b64decode(pad(h64)))
            if header.get("alg") != "HS256":
                return None
            want = hmac.new(self.jwt_key, f"{h64}.{c64}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(want, base64.urlsafe_b64decode(pad(s64))):
                return None
            claims = json.loads(base64.urlsafe_b64decode(pad(c64)))
            if int(claims.get("exp", 0)) < time.time():
                return None
            return self.persons.get(int(claims["sub"]))
        except (ValueError, KeyError, TypeError):
            return None


@lru_cache(maxsize=512)
def photo_blob(seed, pid):
    """A deterministic JPEG-looking blob of 8..40 KiB (not a valid image)."""
    r = random.Random(f"photo:{seed}:{pid}")
    n = r.randint(8 * 1024, 40 * 1024)
    head = b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    head += b"\xff\xfe" + struct.pack(">H", 2 + 24) + f"skolportalen synthetic {pid:>5}"[:24].encode()
    body = r.randbytes(n - len(head) - 2)
    return head + body + b"\xff\xd9"


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

class HTTPError(Exception):
    def __init__(self, status, error, detail=None):
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


ROUTES = [
    ("POST", re.compile(r"/login"), "login"),
    ("POST", re.compile(r"/logout"), "logout"),
    ("POST", re.compile(r"/api/token"), "token"),
    ("GET", re.compile(r"/api/me"), "me"),
    ("GET", re.compile(r"/api/addressbook/schools/([^/]+)/persons"), "school_persons"),
    ("GET", re.compile(r"/api/addressbook/classes/([^/]+)/persons"), "class_persons"),
    ("GET", re.compile(r"/api/addressbook/persons"), "query_persons"),
    ("GET", re.compile(r"/api/addressbook/search"), "search"),
    ("GET", re.compile(r"/api/addressbook/persons/(\d+)"), "person"),
    ("GET", re.compile(r"/api/addressbook/persons/(\d+)/photo"), "photo"),
    ("GET", re.compile(r"/api/test/bytes/(\d+)"), "test_bytes"),
    ("POST", re.compile(r"/api/test/echo"), "test_echo"),
]
NO_AUTH = {"login", "logout", "token", "test_bytes", "test_echo"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Skolportalen/1.0"
    sys_version = ""

    def version_string(self):
        return self.server_version
    timeout = 120  # idle keep-alive connections are closed after this

    # -- plumbing ------------------------------------------------------------
    def setup(self):
        self._tls_failed = False
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(30)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError):
                self._tls_failed = True
        super().setup()

    def handle(self):
        if not self._tls_failed:
            super().handle()

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusals (a request line or headers it cannot parse): recorded too.
        self._status = code
        self._record()
        super().send_error(code, message, explain)

    def parse_request(self):
        # One handler serves every request of a connection: nothing of the last one carries over.
        self._route, self._status, self._body = None, None, b""
        return super().parse_request()

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("%s - %s\n" % (self.address_string(), fmt % args))

    def _read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            parts, total = [], 0
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise HTTPError(400, "bad_request", "truncated chunked body")
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise HTTPError(400, "bad_request", "bad chunk size") from None
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_BODY:
                    raise HTTPError(413, "payload_too_large")
                parts.append(self.rfile.read(size))
                self.rfile.readline(16)
            return b"".join(parts)
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HTTPError(400, "bad_request", "bad Content-Length") from None
        if n < 0:
            raise HTTPError(400, "bad_request", "bad Content-Length")
        if n > MAX_BODY:
            raise HTTPError(413, "payload_too_large")
        return self.rfile.read(n) if n else b""

    def _send(self, status, body, ctype, headers=()):
        self._status = status
        self._record()  # before the answer: once a client has it, its line is written
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Header and body in one write (no Nagle/delayed-ACK stall between them).
        self._headers_buffer.append(b"\r\n")
        head = b"".join(self._headers_buffer)
        self._headers_buffer = []
        if self.command == "HEAD" or not len(body):
            self.wfile.write(head)
        elif len(body) <= 256 * 1024:
            self.wfile.write(head + bytes(body))
        else:
            self.wfile.write(head)
            self.wfile.write(body)

    def _json(self, status, obj, headers=()):
        body = obj if isinstance(obj, bytes) else json.dumps(
            obj, ensure_ascii=False, separators=(",", ":")).encode()
        self._send(status, body, "application/json; charset=utf-8",
                   (("Cache-Control", "no-store"),) + tuple(headers))

    def _dispatch(self):
        self._body = b""
        self._route = None
        try:
            self._body = self._read_body()
            url = urlsplit(self.path)
            self._query = parse_qs(url.query, keep_blank_values=True)
            path = unquote(url.path)
            for method, rx, name in ROUTES:
                m = rx.fullmatch(path)
                if m and method == self.command:
                    self._route = name
                    caller = None if name in NO_AUTH else self._auth()
                    return getattr(self, "r_" + name)(caller, *m.groups())
            raise HTTPError(404, "not_found")
        except HTTPError as e:
            if e.status == 413:
                self.close_connection = True
            obj = {"error": e.error, "status": e.status}
            if e.detail:
                obj["detail"] = e.detail
            hdrs = (("WWW-Authenticate", 'Bearer realm="skolportalen"'),) if e.status == 401 else ()
            self._json(e.status, obj, hdrs)

    def _record(self):
        """One line of --record: what this request was as received, and whom it authenticated.

        ``user`` is whom the request's credentials resolve to by the rules of _auth, whatever
        the route (so a 404 with a valid cookie still names its caller); ``rid`` is the
        client's ``X-Request-Id`` (the join key of the differential suite)."""
        out = self.server.record
        if out is None:
            return
        headers = getattr(self, "headers", None)
        kind, cred, person = self._identify() if headers is not None else (None, None, None)
        line = {
            "rid": headers.get("X-Request-Id") if headers is not None else None,
            "method": getattr(self, "command", None),
            "target": getattr(self, "path", None),
            "path": unquote(urlsplit(self.path).path) if getattr(self, "path", None) else None,
            "version": getattr(self, "request_version", None),
            "route": getattr(self, "_route", None),
            "headers": [[k, v] for k, v in headers.items()] if headers is not None else None,
            "auth": kind,
            "cookie": cred if kind == "cookie" else None,
            "user": person["id"] if person else None,
            "status": getattr(self, "_status", None),
            "body_bytes": len(getattr(self, "_body", b"")),
        }
        text = json.dumps(line, ensure_ascii=True, separators=(",", ":")) + "\n"
        with self.server.record_lock:
            out.write(text)
            out.flush()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    # -- helpers -------------------------------------------------------------
    @property
    def store(self):
        return self.server.store

    def _identify(self):
        """(kind, credential, person or None): the credential that decides who calls (a bearer
        header when present, else the session cookie) and whom it names."""
        authz = self.headers.get("Authorization") or ""
        if authz.lower().startswith("bearer "):
            token = authz[7:].strip()
            return "bearer", token, self.store.check_jwt(token)
        sid = self._cookie("skolsid")
        if sid:
            uid = self.server.sessions.get(sid)
            return "cookie", sid, (self.store.persons[uid] if uid is not None else None)
        return None, None, None

    def _auth(self):
        kind, _cred, person = self._identify()
        if person:
            return person
        if kind == "bearer":
            raise HTTPError(401, "unauthorized", "invalid or expired token")
        raise HTTPError(401, "unauthorized")

    def _cookie(self, name):
        for part in "; ".join(self.headers.get_all("Cookie") or ()).split(";"):
            k, _, v = part.strip().partition("=")
            if k == name:
                return v
        return None

    def _credentials(self):
        ctype = (self.headers.get("Content-Type") or "").lower()
        try:
            if "json" in ctype:
                obj = json.loads(self._body or b"{}")
                return str(obj.get("username", "")), str(obj.get("password", ""))
            form = parse_qs(self._body.decode("utf-8"), keep_blank_values=True)
            return form.get("username", [""])[0], form.get("password", [""])[0]
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise HTTPError(400, "bad_request", "malformed credentials") from None

    def _login_check(self):
        user, pw = self._credentials()
        acct = self.store.accounts.get(user)
        if not acct or not hmac.compare_digest(acct["password"].encode(), pw.encode()):
            raise HTTPError(401, "invalid_credentials")
        return self.store.persons[acct["userId"]]

    def _q(self, name, default=None):
        v = self._query.get(name)
        return v[0] if v else default

    def _int(self, name, default, lo, hi):
        raw = self._q(name)
        if raw is None or raw == "":
            return default
        try:
            v = int(raw)
        except ValueError:
            raise HTTPError(400, "bad_request", f"{name} must be an integer") from None
        if not lo <= v <= hi:
            raise HTTPError(400, "bad_request", f"{name} must be in {lo}..{hi}")
        return v

    def _paging(self):
        page = self._int("page", 1, 1, 10 ** 6)
        size = self._int("pageSize", 50, 1, 1000 if self.store.vulnerable else 100)
        return page, size

    def _scope(self, caller, school_id):
        """The school whose data may be shown (see the access rules)."""
        if school_id != caller["schoolId"] and not self.store.vulnerable:
            raise HTTPError(403, "forbidden", "not your school")
        if school_id not in self.store.schools:
            raise HTTPError(404, "not_found", "no such school")
        return school_id

    def _list(self, caller, members, scope, extra):
        page, size = self._paging()
        vis = [p for p in members if self.store.visible(caller, p, scope)]
        chunk = vis[(page - 1) * size: page * size]
        head = dict(extra, page=page, pageSize=size, total=len(vis))
        head_json = json.dumps(head, ensure_ascii=False, separators=(",", ":"))
        body = (head_json[:-1] + ',"persons":['
                + ",".join(self.store.public_json[p["id"]] for p in chunk) + "]}")
        self._json(200, body.encode())

    def _person_for(self, caller, pid):
        p = self.store.persons.get(int(pid))
        if p is None:
            raise HTTPError(404, "not_found", "no such person")
        scope = p["schoolId"] if self.store.vulnerable else caller["schoolId"]
        if not self.store.visible(caller, p, scope):
            raise HTTPError(403, "forbidden")
        return p

    # -- routes --------------------------------------------------------------
    def r_login(self, _caller):
        p = self._login_check()
        sid = secrets.token_hex(16)
        self.server.sessions[sid] = p["id"]
        self._json(200, {"ok": True, "userId": p["id"]}, (
            ("Set-Cookie", f"skolsid={sid}; Path=/; HttpOnly; Secure; SameSite=Lax"),))

    def r_logout(self, _caller):
        sid = self._cookie("skolsid")
        if sid:
            self.server.sessions.pop(sid, None)
        self._json(200, {"ok": True}, (
            ("Set-Cookie", "skolsid=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax"),))

    def r_token(self, _caller):
        p = self._login_check()
        self._json(200, {"access_token": self.store.make_jwt(p), "token_type": "Bearer",
                         "expires_in": 3600})

    def r_me(self, caller):
        self._json(200, {"id": caller["id"], "username": caller["username"],
                         "role": caller["role"], "schoolId": caller["schoolId"],
                         "name": caller["name"]})

    def r_school_persons(self, caller, school_id):
        scope = self._scope(caller, school_id)
        self._list(caller, self.store.school_members[scope], scope, {"schoolId": scope})

    def _class(self, caller, class_id):
        c = self.store.classes.get(class_id)
        if c is None:
            if self.store.vulnerable:
                raise HTTPError(404, "not_found", "no such class")
            raise HTTPError(403, "forbidden", "not your school")
        return c

    def r_class_persons(self, caller, class_id):
        c = self._class(caller, class_id)
        scope = self._scope(caller, c["schoolId"])
        self._list(caller, self.store.class_members[c["id"]], scope,
                   {"schoolId": scope, "classId": c["id"], "className": c["name"]})

    def r_query_persons(self, caller):
        school_id = self._q("schoolId") or None
        class_id = self._q("classId") or None
        if class_id:
            c = self._class(caller, class_id)
            if school_id and school_id != c["schoolId"]:
                raise HTTPError(400, "bad_request", "classId is not in schoolId")
            scope = self._scope(caller, c["schoolId"])
            self._list(caller, self.store.class_members[c["id"]], scope,
                       {"schoolId": scope, "classId": c["id"], "className": c["name"]})
        else:
            scope = self._scope(caller, school_id or caller["schoolId"])
            self._list(caller, self.store.school_members[scope], scope, {"schoolId": scope})

    def r_search(self, caller):
        q = (self._q("q") or "").strip().casefold()
        if not q:
            raise HTTPError(400, "bad_request", "q is required")
        scope = caller["schoolId"]
        hits = [p for p in self.store.school_members[scope]
                if self.store.visible(caller, p, scope)
                and any(s.casefold().startswith(q) for s in
                        (p["firstName"], p["lastName"], p["name"], p.get("nickname", "")) if s)]
        body = (json.dumps({"q": self._q("q"), "schoolId": scope, "total": len(hits)},
                           ensure_ascii=False, separators=(",", ":"))[:-1]
                + ',"persons":[' + ",".join(self.store.public_json[p["id"]] for p in hits[:25])
                + "]}")
        self._json(200, body.encode())

    def r_person(self, caller, pid):
        p = self._person_for(caller, pid)
        self._json(200, self.store.public_json[p["id"]].encode())

    def r_photo(self, caller, pid):
        p = self._person_for(caller, pid)
        if not p["hasPhoto"]:
            raise HTTPError(404, "not_found", "no photo")
        self._send(200, photo_blob(self.store.seed, p["id"]), "image/jpeg",
                   (("Cache-Control", "private, max-age=600"),))

    def r_test_bytes(self, _caller, n):
        n = int(n)
        if n > MAX_TEST_BYTES:
            raise HTTPError(400, "bad_request", f"n must be 0..{MAX_TEST_BYTES}")
        self._send(200, test_bytes(n), "application/octet-stream")

    def r_test_echo(self, _caller):
        ctype = self.headers.get("Content-Type") or "application/octet-stream"
        self._send(200, self._body, ctype)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    record = None
    request_queue_size = 256
    ssl_context = None
    verbose = False

    def get_request(self):
        sock, addr = self.socket.accept()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address):
        if self.verbose:
            super().handle_error(request, client_address)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Skolportalen demo platform (synthetic data)")
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--vulnerable", action="store_true",
                    help="do not check schoolId/classId/person against the caller")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--dump-data", metavar="FILE")
    ap.add_argument("--record", metavar="FILE",
                    help="append one JSON line per answered request (what it received, whom "
                         "it authenticated)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    data = generate(args.seed)
    if args.dump_data:
        tmp = args.dump_data + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
        os.replace(tmp, args.dump_data)
        return 0
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")

    def on_signal(signum, _frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    Server.address_family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    srv = Server((args.host, args.port), Handler)
    srv.store = Store(data, args.vulnerable)
    srv.sessions = {}
    srv.verbose = args.verbose
    srv.record = open(args.record, "a", encoding="ascii") if args.record else None
    srv.record_lock = threading.Lock()
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        ctx.set_alpn_protocols(["http/1.1"])
        srv.ssl_context = ctx
    port = srv.server_address[1]
    print(f"READY {port}", flush=True)
    try:
        srv.serve_forever(poll_interval=0.5)
    except SystemExit:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
