#!/usr/bin/env python3
"""Traffic generator for the Skolportalen demo: real HTTPS clients.

    python3 traffic.py --base https://127.0.0.1:8443 --cafile CERT \
        --data dataset.json --users 40 --duration 20 [--abuser] \
        [--concurrency 8] [--seed 1] --out summary.json

Python 3.11 standard library only.  Every simulated user owns one
``http.client.HTTPSConnection`` (keep-alive, verified TLS against --cafile)
that it reuses for all its requests.

Ordinary users (--users N; a deterministic mix of pupils, guardians, teachers,
principals and admins from every school, chosen with --seed) log in with the
session cookie (POST /login, form or JSON) or get a bearer token (POST
/api/token, about a quarter of them), call /api/me, list their class, page
through their school a little, search, open a few persons and photos, and
log out.  They only ask for data the access rules let them see, so they get
200s (and a few deliberate 404s for non-existent person ids), never 403.
About half of them send ``Accept-Encoding: gzip``.

The users run --concurrency at a time (a pool of worker threads); each user
gets an equal share of --duration (duration / number of waves) and spreads
its think time over that share (scaled by --think-scale; 0 = no pauses), so
--duration bounds the run unless the server is too slow.  The request plan
of every user is computed up front from the dataset and --seed, so two runs
with the same inputs send the same requests (only the interleaving differs).

The abuser (--abuser; an extra pupil account, not one of --users) starts
after --abuser-delay seconds, logs in, looks normal for three requests, then
as fast as it can: walks every other school's address book through the
unchecked parameter (GET /api/addressbook/persons?schoolId=<other>&page=N
&pageSize=100, until a page is refused or the total is reached), fetches a
few other schools' class lists (?classId=), enumerates --abuser-enum
consecutive person ids after its own (GET /api/addressbook/persons/{id}) and
downloads photos (GET .../photo) of the records it obtained (plus a guess for
every 4th refused id), at most --abuser-photos (--abuser-interval seconds
between harvesting requests, default 0).  Against a non-vulnerable
server the cross-school requests get 403.  When the agent blocks it, its
requests fail at the transport level (reset, or no answer within 5 s): those
failures are counted apart (``totals.abusive.transportErrors``), and after
5 failures in a row it gives up (``users[].gaveUp``).

Summary JSON (--out):
  {"config": {...}, "startedAt", "finishedAt", "elapsedSeconds",
   "users": [{"userId","username","role","schoolId","auth","gzip","abuser",
              "requests","localPorts","credential"}],
   "requests": [{"seq","t","latencyMs","userId","username","role","schoolId",
                 "method","path","route","status","bodyLength","decodedLength",
                 "contentType","contentEncoding","localPort","connection",
                 "auth","abusive","targetSchool","crossSchool","retried","error",
                 "personIds","total"}],
   "totals": {"requests","transportErrors","retries","bytesReceived",
              "requestsPerSecond","perStatus","perRoute","perRole","abusive"},
   "secretsSeen": {"passwords","sessionCookies","bearerTokens"}}
``path`` includes the query string; ``route`` is the template, e.g.
"GET /api/addressbook/persons/{id}"; ``bodyLength`` is the entity body as
received (after de-chunking, still compressed if gzip), ``decodedLength``
after gunzip; ``localPort`` is the client's TCP port of the connection used;
``status`` is null and ``error`` set when the request failed at the
transport level.  ``personIds`` are the top-level person ids the platform
returned: for a 200 list or search response the ids of ``persons`` in order,
for a 200 GET /api/addressbook/persons/{id} the id in the body, for a 200
photo the path id, else [] (embedded guardians/children are not listed: the
dataset says who they are); ``total`` is the body's ``total`` of a 200 list or
search response, else null.  A user's ``credential`` is the session
credential it was issued, ``{"kind": "cookie"|"bearer", "value": <cookie value
or token>}``, null if it never logged in (the values are also listed in
``secretsSeen``).  Exit status 1 if any request failed at the transport level
(after one retry on a fresh connection) for an ordinary user (the abuser's
failures are what enforcement looks like), 2 on usage errors.
"""

import argparse
import gzip
import http.client
import json
import math
import os
import queue
import random
import re
import ssl
import sys
import threading
import time
from urllib.parse import urlencode, urlsplit

STAFF = ("teacher", "principal", "admin")
UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Skolportalen/4.2.1 (iPhone; iOS 17.1.2)",
    "Skolportalen/4.2.0 (Android 14; SM-A546B)",
]
ROUTES = [
    (re.compile(r"/api/addressbook/schools/[^/]+/persons"), "/api/addressbook/schools/{schoolId}/persons"),
    (re.compile(r"/api/addressbook/classes/[^/]+/persons"), "/api/addressbook/classes/{classId}/persons"),
    (re.compile(r"/api/addressbook/persons/\d+/photo"), "/api/addressbook/persons/{id}/photo"),
    (re.compile(r"/api/addressbook/persons/\d+"), "/api/addressbook/persons/{id}"),
    (re.compile(r"/api/test/bytes/\d+"), "/api/test/bytes/{n}"),
]


LISTS = {"GET /api/addressbook/persons", "GET /api/addressbook/schools/{schoolId}/persons",
         "GET /api/addressbook/classes/{classId}/persons", "GET /api/addressbook/search"}


def returned_persons(route, path, data):
    """(personIds, total) of a 200 address-book response body (see the docstring)."""
    if route == "GET /api/addressbook/persons/{id}/photo":
        return [int(path.split("?", 1)[0].split("/")[-2])], None
    if route != "GET /api/addressbook/persons/{id}" and route not in LISTS:
        return [], None
    try:
        obj = json.loads(data)
    except (TypeError, ValueError):
        return [], None
    if route in LISTS:
        return [p["id"] for p in obj.get("persons", [])], obj.get("total")
    return ([obj["id"]] if "id" in obj else []), None


def route_of(method, path):
    p = path.split("?", 1)[0]
    for rx, tmpl in ROUTES:
        if rx.fullmatch(p):
            return f"{method} {tmpl}"
    return f"{method} {p}"


class Dataset:
    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        self.raw = d
        self.persons = {p["id"]: p for p in d["persons"]}
        self.accounts = {a["userId"]: a for a in d["accounts"]}
        self.schools = {s["id"]: s for s in d["schools"]}
        self.classes = {c["id"]: c for c in d["classes"]}
        self.by_school = {}
        for p in d["persons"]:
            self.by_school.setdefault(p["schoolId"], []).append(p)
        self.min_id = min(self.persons)
        self.max_id = max(self.persons)

    def class_members(self, cid):
        c = self.classes[cid]
        ids = list(c["pupilIds"]) + ([c["mentorId"]] if c["mentorId"] else [])
        return [self.persons[i] for i in ids]

    def visible_count(self, caller, school_id):
        """How many persons of school_id the caller may list (own school rule)."""
        members = self.by_school[school_id]
        if caller["role"] != "guardian":
            return len(members)
        kids = [self.persons[i] for i in caller["childIds"]]
        classes = {k["classId"] for k in kids}
        related = {caller["id"]} | {k["id"] for k in kids}
        return sum(1 for p in members if p["role"] in STAFF or p["id"] in related
                   or (p["role"] == "pupil" and p["classId"] in classes))


# ---------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------

def q(path, **params):
    return path + "?" + urlencode(params)


def prefix(rng, name):
    return name[: rng.randint(2, 4)]


def plan_user(ds, person, rng):
    """The ordered list of (method, path) an ordinary user sends after logging in."""
    sid = person["schoolId"]
    role = person["role"]
    school = ds.by_school[sid]
    acts = [("GET", "/api/me")]
    opened = []

    def open_persons(cands, n, photos):
        cands = [c for c in cands if c["id"] not in opened]
        for p in rng.sample(cands, min(n, len(cands))):
            opened.append(p["id"])
            acts.append(("GET", f"/api/addressbook/persons/{p['id']}"))
            if p["hasPhoto"] and photos > 0 and rng.random() < 0.7:
                photos -= 1
                acts.append(("GET", f"/api/addressbook/persons/{p['id']}/photo"))

    def school_pages(size, max_pages, variant):
        total = ds.visible_count(person, sid)
        pages = max(1, math.ceil(total / size))
        for page in range(1, min(pages, max_pages) + 1):
            if variant == "path":
                acts.append(("GET", q(f"/api/addressbook/schools/{sid}/persons",
                                      page=page, pageSize=size)))
            else:
                acts.append(("GET", q("/api/addressbook/persons", schoolId=sid,
                                      page=page, pageSize=size)))

    def search(pool):
        who = rng.choice(pool)
        acts.append(("GET", q("/api/addressbook/search",
                              q=prefix(rng, rng.choice([who["firstName"], who["lastName"]])))))

    staff = [p for p in school if p["role"] in STAFF]
    if role == "pupil":
        cid = person["classId"]
        mates = [p for p in ds.class_members(cid) if p["id"] != person["id"]]
        if rng.random() < 0.5:
            acts.append(("GET", f"/api/addressbook/classes/{cid}/persons"))
        else:
            acts.append(("GET", q("/api/addressbook/persons", schoolId=sid, classId=cid,
                                  page=1, pageSize=50)))
        school_pages(50, rng.randint(1, 2), "query")
        search(school)
        open_persons(mates, rng.randint(2, 4), rng.randint(1, 3))
        if rng.random() < 0.5:
            open_persons(staff, 1, 1)
    elif role == "guardian":
        kids = [ds.persons[i] for i in person["childIds"]]
        for kid in kids:
            acts.append(("GET", q("/api/addressbook/persons", classId=kid["classId"],
                                  page=1, pageSize=50)))
        open_persons(kids, len(kids), len(kids))
        mentors = [ds.persons[ds.classes[k["classId"]]["mentorId"]] for k in kids]
        open_persons(mentors, len(mentors), 0)
        search(staff)
        if rng.random() < 0.4:
            school_pages(50, 1, "query")
    elif role == "teacher":
        cid = person.get("classId") or rng.choice(ds.schools[sid]["classIds"])
        acts.append(("GET", f"/api/addressbook/classes/{cid}/persons"))
        school_pages(50, rng.randint(1, 3), rng.choice(["path", "query"]))
        search(school)
        search(school)
        pupils = [p for p in ds.class_members(cid) if p["role"] == "pupil"]
        open_persons(pupils, rng.randint(2, 4), rng.randint(1, 3))
        guardians = [ds.persons[g] for p in pupils for g in p["guardianIds"]]
        open_persons(guardians, rng.randint(0, 2), 0)
        open_persons(staff, rng.randint(1, 2), 1)
    else:  # principal, admin
        school_pages(100, 99, rng.choice(["path", "query"]))
        cid = rng.choice(ds.schools[sid]["classIds"])
        acts.append(("GET", q("/api/addressbook/persons", schoolId=sid, classId=cid,
                              page=1, pageSize=50)))
        search(school)
        search(staff)
        open_persons(school, rng.randint(4, 8), rng.randint(2, 3))
    if rng.random() < 0.15:  # a stale link: unknown person id -> 404
        acts.insert(rng.randint(2, len(acts)), ("GET", f"/api/addressbook/persons/{ds.max_id + rng.randint(1, 500)}"))
    return acts


def pick_users(ds, n, rng, exclude=()):
    """A deterministic role mix of n distinct persons spread over the schools."""
    shares = [("principal", 0.06), ("admin", 0.06), ("teacher", 0.24), ("guardian", 0.30)]
    want = {}
    for role, share in shares:
        want[role] = max(1 if n >= len(shares) + 1 else 0, round(n * share))
    want["pupil"] = max(0, n - sum(want.values()))
    while sum(want.values()) > n:  # tiny n
        r = max(want, key=lambda k: want[k])
        want[r] -= 1
    chosen = []
    schools = sorted(ds.schools)
    for role in ("pupil", "guardian", "teacher", "principal", "admin"):
        pool = [p for p in ds.persons.values() if p["role"] == role and p["id"] not in exclude]
        by_school = {s: [p for p in pool if p["schoolId"] == s] for s in schools}
        for s in by_school.values():
            rng.shuffle(s)
        k, i = want.get(role, 0), rng.randrange(len(schools))
        while k > 0 and any(by_school.values()):
            s = schools[i % len(schools)]
            i += 1
            if by_school[s]:
                chosen.append(by_school[s].pop())
                k -= 1
    rng.shuffle(chosen)
    return chosen


# ---------------------------------------------------------------------------
# client
# ---------------------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.entries = []
        self.t0 = time.monotonic()
        self.secrets = {"passwords": set(), "sessionCookies": set(), "bearerTokens": set()}

    def add(self, entry):
        with self.lock:
            entry["seq"] = len(self.entries)
            self.entries.append(entry)

    def secret(self, kind, value):
        if value:
            with self.lock:
                self.secrets[kind].add(value)


# The abuser stops after this many requests in a row failed at the transport level (blocked).
ABUSER_GIVES_UP = 5


class Blocked(Exception):
    """The abuser's connections keep failing: it has been blocked."""


class Client:
    """One simulated user: one keep-alive HTTPS connection, cookie or bearer auth."""

    def __init__(self, base, ctx, rec, person, account, ds, ua, use_gzip, abuser=False):
        u = urlsplit(base)
        self.host, self.port = u.hostname, u.port or 443
        self.ctx, self.rec, self.ds = ctx, rec, ds
        self.person, self.account, self.ua, self.gzip = person, account, ua, use_gzip
        self.abuser = abuser
        self.pace = 0.0
        self.conn = None
        self.conn_no = 0
        self.cookie = None
        self.token = None
        self.credential = None
        self.auth = "none"
        self.failures = 0
        self.consecutive_failures = 0
        self.gave_up = False
        self.count = 0
        self.ports = []

    def _connect(self):
        # The abuser may be blocked (responses dropped): it waits less long for answers.
        self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx,
                                                timeout=5 if self.abuser else 60)
        self.conn_no += 1

    def close(self):
        if self.conn:
            self.conn.close()
            self.conn = None

    def request(self, method, path, body=None, ctype=None, abusive=False):
        if abusive and self.pace > 0:
            time.sleep(self.pace)
        headers = {"User-Agent": self.ua, "Accept": "application/json"}
        if self.gzip:
            headers["Accept-Encoding"] = "gzip"
        if ctype:
            headers["Content-Type"] = ctype
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        elif self.cookie:
            headers["Cookie"] = "skolsid=" + self.cookie
        if isinstance(body, str):
            body = body.encode()
        target = target_school(self.ds, path)
        entry = {
            "t": round(time.monotonic() - self.rec.t0, 4),
            "userId": self.person["id"], "username": self.account["username"],
            "role": self.person["role"], "schoolId": self.person["schoolId"],
            "method": method, "path": path, "route": route_of(method, path),
            "status": None, "bodyLength": None, "decodedLength": None,
            "contentType": None, "contentEncoding": None, "localPort": None,
            "connection": None, "auth": "bearer" if self.token else "cookie" if self.cookie else "none",
            "abusive": abusive, "targetSchool": target,
            "crossSchool": bool(target and target != self.person["schoolId"]),
            "retried": False, "error": None, "personIds": [], "total": None,
            "abuser": self.abuser,
        }
        t = time.monotonic()
        data = None
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self._connect()
                self.conn.request(method, path, body=body, headers=headers)
                entry["localPort"] = self.conn.sock.getsockname()[1]
                entry["connection"] = f"{self.person['id']}#{self.conn_no}"
                resp = self.conn.getresponse()
                data = resp.read()
                entry["status"] = resp.status
                entry["error"] = None
                break
            except (OSError, http.client.HTTPException) as e:
                entry["error"] = f"{type(e).__name__}: {e}"
                self.close()
                if attempt == 0:
                    entry["retried"] = True
                    continue
        entry["latencyMs"] = round((time.monotonic() - t) * 1000, 2)
        self.count += 1
        if entry["localPort"] and entry["localPort"] not in self.ports:
            self.ports.append(entry["localPort"])
        if data is None:
            self.failures += 1
            self.consecutive_failures += 1
            self.rec.add(entry)
            if self.abuser and self.consecutive_failures >= ABUSER_GIVES_UP:
                raise Blocked()
            return None, None, None
        self.consecutive_failures = 0
        enc = resp.getheader("Content-Encoding")
        entry["bodyLength"] = len(data)
        entry["contentType"] = resp.getheader("Content-Type")
        entry["contentEncoding"] = enc
        if enc == "gzip":
            data = gzip.decompress(data)
        entry["decodedLength"] = len(data)
        if resp.status == 200:
            entry["personIds"], entry["total"] = returned_persons(entry["route"], path, data)
        self.rec.add(entry)
        if resp.will_close:
            self.close()
        return resp.status, resp, data

    def json(self, data):
        try:
            return json.loads(data)
        except (TypeError, ValueError):
            return None

    def login(self, rng, bearer):
        creds = {"username": self.account["username"], "password": self.account["password"]}
        self.rec.secret("passwords", self.account["password"])
        if bearer:
            status, _, data = self.request("POST", "/api/token", json.dumps(creds),
                                           "application/json")
            obj = self.json(data) if status == 200 else None
            self.token = obj and obj.get("access_token")
            self.auth = "bearer"
            self.rec.secret("bearerTokens", self.token)
            if self.token:
                self.credential = {"kind": "bearer", "value": self.token}
            return bool(self.token)
        if rng.random() < 0.5:
            status, resp, _ = self.request("POST", "/login", urlencode(creds),
                                           "application/x-www-form-urlencoded")
        else:
            status, resp, _ = self.request("POST", "/login", json.dumps(creds),
                                           "application/json")
        self.auth = "cookie"
        if status == 200:
            for k, v in resp.getheaders():
                if k.lower() == "set-cookie" and v.startswith("skolsid="):
                    self.cookie = v.split(";", 1)[0].split("=", 1)[1]
            self.rec.secret("sessionCookies", self.cookie)
            if self.cookie:
                self.credential = {"kind": "cookie", "value": self.cookie}
        return bool(self.cookie)

    def logout(self):
        if self.cookie:
            self.request("POST", "/logout", b"", "application/x-www-form-urlencoded")
            self.cookie = None

    def summary(self):
        return {"userId": self.person["id"], "username": self.account["username"],
                "role": self.person["role"], "schoolId": self.person["schoolId"],
                "auth": self.auth, "gzip": self.gzip, "abuser": self.abuser,
                "requests": self.count, "localPorts": self.ports,
                "credential": self.credential, "gaveUp": self.gave_up}


def target_school(ds, path):
    p, _, query = path.partition("?")
    m = re.fullmatch(r"/api/addressbook/persons/(\d+)(?:/photo)?", p)
    if m:
        person = ds.persons.get(int(m.group(1)))
        return person["schoolId"] if person else None
    m = re.fullmatch(r"/api/addressbook/(schools|classes)/([^/]+)/persons", p)
    if m:
        if m.group(1) == "schools":
            return m.group(2)
        c = ds.classes.get(m.group(2))
        return c["schoolId"] if c else None
    if p == "/api/addressbook/persons":
        params = dict(kv.split("=", 1) for kv in query.split("&") if "=" in kv)
        if "classId" in params:
            c = ds.classes.get(params["classId"])
            return c["schoolId"] if c else None
        return params.get("schoolId")
    return None


def run_user(client, plan, rng, bearer, budget, think_scale):
    deadline = time.monotonic() + budget
    try:
        if not client.login(rng, bearer):
            return
        steps = plan + ([("POST", "/logout")] if not bearer else [])
        jitters = [rng.uniform(0.5, 1.5) for _ in steps]
        for i, (method, path) in enumerate(steps):
            remaining = deadline - time.monotonic()
            if think_scale > 0 and remaining > 0:
                time.sleep(min(remaining, remaining / (len(steps) - i + 1) * jitters[i]
                               * think_scale))
            if method == "POST" and path == "/logout":
                client.logout()
            else:
                client.request(method, path)
    finally:
        client.close()


def run_abuser(client, ds, args, rng):
    try:
        harvest(client, ds, args, rng)
    except Blocked:
        client.gave_up = True
    finally:
        client.close()


def harvest(client, ds, args, rng):
    me = client.person
    if not client.login(rng, bearer=False):
        return
    client.request("GET", "/api/me")
    client.request("GET", q("/api/addressbook/persons", classId=me["classId"], page=1,
                            pageSize=50))
    client.request("GET", q("/api/addressbook/persons", schoolId=me["schoolId"], page=1,
                            pageSize=50))
    others = [s for s in sorted(ds.schools) if s != me["schoolId"]]
    for sid in others:  # the incident: walk other schools via the schoolId parameter
        page = 1
        while True:
            status, _, data = client.request(
                "GET", q("/api/addressbook/persons", schoolId=sid, page=page, pageSize=100),
                abusive=True)
            obj = client.json(data) if status == 200 else None
            if not obj or not obj.get("persons") or page * 100 >= obj.get("total", 0):
                break
            page += 1
    for sid in others[:3]:
        cid = ds.schools[sid]["classIds"][0]
        client.request("GET", q("/api/addressbook/persons", classId=cid, page=1, pageSize=100),
                       abusive=True)
    photos = 0
    for k in range(1, args.abuser_enum + 1):
        pid = me["id"] + k
        status, _, data = client.request("GET", f"/api/addressbook/persons/{pid}", abusive=True)
        obj = client.json(data) if status == 200 else None
        want_photo = bool(obj and obj.get("photoUrl")) or (status == 403 and k % 4 == 0)
        if want_photo and photos < args.abuser_photos:
            photos += 1
            client.request("GET", f"/api/addressbook/persons/{pid}/photo", abusive=True)
    client.logout()


def totals(entries, elapsed):
    t = {"requests": len(entries), "transportErrors": 0, "retries": 0, "bytesReceived": 0,
         "requestsPerSecond": round(len(entries) / elapsed, 2) if elapsed else None,
         "perStatus": {}, "perRoute": {}, "perRole": {},
         "abusive": {"requests": 0, "perStatus": {}, "crossSchool": 0,
                     "transportErrors": 0, "retries": 0}}
    for e in entries:
        st = str(e["status"]) if e["status"] is not None else "transport_error"
        # The abuser's failures are what enforcement looks like from the client: counted apart.
        side = t["abusive"] if e["abuser"] else t
        if e["status"] is None:
            side["transportErrors"] += 1
        if e["retried"]:
            side["retries"] += 1
        t["bytesReceived"] += e["bodyLength"] or 0
        t["perStatus"][st] = t["perStatus"].get(st, 0) + 1
        r = t["perRoute"].setdefault(e["route"], {"count": 0, "perStatus": {}, "bytes": 0,
                                                  "decodedBytes": 0})
        r["count"] += 1
        r["perStatus"][st] = r["perStatus"].get(st, 0) + 1
        r["bytes"] += e["bodyLength"] or 0
        r["decodedBytes"] += e["decodedLength"] or 0
        t["perRole"][e["role"]] = t["perRole"].get(e["role"], 0) + 1
        if e["abusive"]:
            a = t["abusive"]
            a["requests"] += 1
            a["perStatus"][st] = a["perStatus"].get(st, 0) + 1
            a["crossSchool"] += 1 if e["crossSchool"] else 0
    for r in t["perRoute"].values():
        r["meanBytes"] = round(r["bytes"] / r["count"], 1)
        r["meanDecodedBytes"] = round(r["decodedBytes"] / r["count"], 1)
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description="Skolportalen traffic generator")
    ap.add_argument("--base", required=True, help="e.g. https://127.0.0.1:8443")
    ap.add_argument("--cafile", help="CA/cert file to verify the server against")
    ap.add_argument("--insecure", action="store_true", help="do not verify TLS (not default)")
    ap.add_argument("--data", required=True, help="dataset.json from app.py --dump-data")
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--abuser", action="store_true")
    ap.add_argument("--abuser-delay", type=float, default=None,
                    help="seconds before the abuser starts (default 10%% of --duration)")
    ap.add_argument("--abuser-enum", type=int, default=400)
    ap.add_argument("--abuser-photos", type=int, default=150)
    ap.add_argument("--abuser-interval", type=float, default=0.0,
                    help="pause between the abuser's harvesting requests (default 0: flat out)")
    ap.add_argument("--bearer-share", type=float, default=0.25)
    ap.add_argument("--think-scale", type=float, default=1.0,
                    help="multiplier for think time; 0 = no pauses (benchmark)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if urlsplit(args.base).scheme != "https":
        ap.error("--base must be https://")
    if args.concurrency < 1 or args.users < 0:
        ap.error("bad --concurrency/--users")

    ds = Dataset(args.data)
    if args.insecure:
        ctx = ssl._create_unverified_context()
    else:
        ctx = ssl.create_default_context(cafile=args.cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    rng = random.Random(f"traffic:{args.seed}")

    abuser_person = None
    if args.abuser:
        pupils = sorted((p for p in ds.persons.values() if p["role"] == "pupil"),
                        key=lambda p: p["id"])
        abuser_person = random.Random(f"abuser:{args.seed}").choice(pupils)
    users = pick_users(ds, args.users, rng,
                       exclude={abuser_person["id"]} if abuser_person else ())
    rec = Recorder()
    jobs = []
    for person in users:
        urng = random.Random(f"user:{args.seed}:{person['id']}")
        bearer = urng.random() < args.bearer_share
        ua = urng.choice(UAS)
        use_gzip = urng.random() < 0.5
        plan = plan_user(ds, person, urng)
        client = Client(args.base, ctx, rec, person, ds.accounts[person["id"]], ds, ua,
                        use_gzip)
        jobs.append((client, plan, urng, bearer))

    waves = max(1, math.ceil(len(jobs) / args.concurrency))
    budget = args.duration * 0.92 / waves
    work = queue.Queue()
    for j in jobs:
        work.put(j)

    def worker():
        while True:
            try:
                client, plan, urng, bearer = work.get_nowait()
            except queue.Empty:
                return
            run_user(client, plan, urng, bearer, budget, args.think_scale)

    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(min(args.concurrency, len(jobs)))]
    abuser_client = None
    if abuser_person:
        arng = random.Random(f"abuser-run:{args.seed}")
        abuser_client = Client(args.base, ctx, rec, abuser_person,
                               ds.accounts[abuser_person["id"]], ds, UAS[0], False, abuser=True)
        abuser_client.pace = args.abuser_interval
        delay = args.duration * 0.1 if args.abuser_delay is None else args.abuser_delay

        def abuse():
            time.sleep(delay)
            run_abuser(abuser_client, ds, args, arng)

        threads.append(threading.Thread(target=abuse, daemon=True))
    started = time.time()
    rec.t0 = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - rec.t0
    clients = [j[0] for j in jobs] + ([abuser_client] if abuser_client else [])
    entries = rec.entries
    summary = {
        "config": {"base": args.base, "cafile": args.cafile, "data": os.path.abspath(args.data),
                   "datasetSeed": ds.raw.get("seed"), "users": args.users,
                   "duration": args.duration, "concurrency": args.concurrency,
                   "seed": args.seed, "abuser": args.abuser,
                   "abuserUserId": abuser_person["id"] if abuser_person else None,
                   "abuserEnum": args.abuser_enum, "abuserPhotos": args.abuser_photos,
                   "abuserInterval": args.abuser_interval,
                   "thinkScale": args.think_scale, "bearerShare": args.bearer_share},
        "startedAt": started, "finishedAt": time.time(), "elapsedSeconds": round(elapsed, 3),
        "users": [c.summary() for c in clients],
        "requests": entries,
        "totals": totals(entries, elapsed),
        "secretsSeen": {k: sorted(v) for k, v in rec.secrets.items()},
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=1)
    os.replace(tmp, args.out)
    tot = summary["totals"]
    if not args.quiet:
        print(f"traffic: {tot['requests']} requests in {elapsed:.2f}s "
              f"({tot['requestsPerSecond']} req/s), {tot['bytesReceived']} body bytes, "
              f"status {tot['perStatus']}, abusive {tot['abusive']['requests']} "
              f"{tot['abusive']['perStatus']}, transport errors {tot['transportErrors']}",
              file=sys.stderr)
    return 1 if tot["transportErrors"] else 0


if __name__ == "__main__":
    sys.exit(main())
