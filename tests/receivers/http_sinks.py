#!/usr/bin/env python3
"""Local stand-ins for the agent's HTTP sinks (tracer-user/tests/http_sinks.rs): Grafana Loki's
push API, Elasticsearch/OpenSearch `_bulk`, and an OpenTelemetry collector's OTLP/HTTP logs
endpoint (JSON encoding). Python 3.11 standard library only.

usage: http_sinks.py --kind loki|elastic|otlp [--cert PEM --key PEM [--client-ca PEM]]

Prints `READY <data_port> <admin_port>` on stdout once both listeners are up (127.0.0.1, ports
chosen by the kernel), and exits when its standard input closes (so it never outlives the test).

What each kind does, as the product documents it:
- loki: `POST /loki/api/v1/push`, `Content-Type: application/json`, body
  `{"streams":[{"stream":{labels},"values":[["<ns>","<line>"],...]}]}`. Each entry is validated
  on its own: the valid ones are stored and, when any was refused, the answer is 400 with the
  last error, `... total ignored: X out of Y for stream: {...}` (text/plain); otherwise 204.
  An exact duplicate (same labels, timestamp and line) is dropped, as Loki does.
- elastic: `POST /_bulk` (any query), `Content-Type: application/x-ndjson` (or application/json;
  anything else 406), body ending in a newline (else 400), `create` actions only. Per item: 201
  created; 409 `version_conflict_engine_exception` when the `_id` is already in that index;
  the answer is 200 `{"took","errors","items":[{"create":{...,"status"}}]}` in request order.
- otlp: `POST /v1/logs`, `Content-Type: application/json` (else 415), an
  ExportLogsServiceRequest; 200 `{}` or `{"partialSuccess":{"rejectedLogRecords":"N",
  "errorMessage":...}}`; errors carry a JSON `google.rpc.Status` (`{"code","message"}`).
Every kind decodes `Content-Encoding: gzip`.

Admin API (plain HTTP on the admin port, JSON in and out):
- `POST /faults {"status":429,"count":2,"retry_after":"1"|"date:2"|null,"body":null}`: the next
  `count` data requests get that answer (and store nothing); `date:N` sends an HTTP-date N
  seconds ahead. Faults queue up in order.
- `POST /config {"marker":"BAD","item_429":3,"max_body":5000,"preload":[ids]}`: a record whose
  line contains `marker` is refused (loki: the entry, as "line too long"; elastic: 400
  `mapper_parsing_exception`; otlp: counted in partialSuccess); elastic: the next `item_429`
  items get 429 `es_rejected_execution_exception`; a body above `max_body` wire bytes gets 413;
  elastic: `preload` ids are already in every index (so `create` answers 409).
- `POST /down {"seconds":2}`: closes the data listener (refused connections; a request already
  on a kept-alive connection is cut off unanswered) and opens it again on the same port later.
- `GET /received`: `{"records": {id: {"stored","attempts",...}}, "requests": [...],
  "duplicates", "tls_errors"}`. Each request: `t_in`/`t_out` (this process's monotonic clock, at
  arrival and just before answering), `status`, `retry_after`, `fault`, `content_encoding`,
  `content_type`, `headers`, `ids` (in body order), `wire_bytes`, `client_cert` (its CN).
"""
import argparse
import email.utils
import gzip
import json
import os
import re
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()


class State:
    def __init__(self, kind):
        self.kind = kind
        self.reset()

    def reset(self):
        self.records = {}
        self.requests = []
        self.faults = []
        self.marker = None
        self.item_429 = 0
        self.max_body = None
        self.preload = set()
        self.down = False
        self.loki_keys = set()
        self.es_docs = set()  # (index, id)
        self.duplicates = 0
        self.tls_errors = []

    def rec(self, rid):
        return self.records.setdefault(rid, {"stored": 0, "attempts": 0})


STATE = None
DATA = {}


def loki_labels(d):
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(d.items())) + "}"


def ids_in(kind, body):
    """Event ids of a request body, in order (best effort, for the request log)."""
    out = []
    try:
        if kind == "elastic":
            lines = body.decode().split("\n")
            for a in lines[0::2]:
                if a.strip():
                    act = json.loads(a)
                    out.append(next(iter(act.values())).get("_id"))
        elif kind == "loki":
            for s in json.loads(body)["streams"]:
                for v in s["values"]:
                    out.append(json.loads(v[1]).get("event", {}).get("id"))
        else:
            for rl in json.loads(body)["resourceLogs"]:
                for sl in rl["scopeLogs"]:
                    for r in sl["logRecords"]:
                        out.append(otlp_attrs(r.get("attributes", [])).get("event.id"))
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration):
        pass
    return out


def otlp_value(v):
    for k in ("stringValue", "intValue", "boolValue", "doubleValue"):
        if k in v:
            return v[k]
    return None


def otlp_attrs(attrs):
    return {a["key"]: otlp_value(a["value"]) for a in attrs}


def fault_body(kind, status):
    if kind == "elastic":
        types = {429: "es_rejected_execution_exception", 401: "security_exception",
                 403: "security_exception", 503: "cluster_block_exception"}
        return "application/json", json.dumps({"error": {
            "type": types.get(status, "exception"), "reason": f"injected {status}"}, "status": status})
    if kind == "otlp":
        return "application/json", json.dumps({"code": 14 if status >= 500 else 8,
                                               "message": f"injected {status}"})
    text = {429: "Ingestion rate limit exceeded for user fake (limit: 4194304 bytes/sec)"}
    return "text/plain; charset=utf-8", text.get(status, f"injected {status}")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def answer(self, entry, status, body=b"", ctype=None, retry_after=None):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        with LOCK:
            entry["status"] = status
            entry["retry_after"] = retry_after
            entry["t_out"] = time.monotonic()
        self.end_headers()
        if status != 204:
            self.wfile.write(body)

    def do_POST(self):
        t_in = time.monotonic()
        n = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(n)
        with LOCK:
            down = STATE.down
            if down:
                STATE.requests.append({"t_in": t_in, "path": self.path, "status": None, "cut": True,
                                       "fault": True, "ids": [], "wire_bytes": len(raw)})
        if down:
            # A crashed receiver: no answer, the connection is cut.
            self.close_connection = True
            return
        cert = None
        try:
            peer = self.connection.getpeercert() if hasattr(self.connection, "getpeercert") else None
            if peer:
                cert = dict(x[0] for x in peer.get("subject", ())).get("commonName")
        except (ValueError, OSError):
            pass
        entry = {"t_in": t_in, "path": self.path, "wire_bytes": len(raw),
                 "content_encoding": self.headers.get("Content-Encoding"),
                 "content_type": self.headers.get("Content-Type"),
                 "headers": {k.lower(): v for k, v in self.headers.items()},
                 "client_cert": cert, "fault": False, "ids": []}
        with LOCK:
            STATE.requests.append(entry)
        body = raw
        if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
            try:
                body = gzip.decompress(raw)
            except (OSError, EOFError) as e:
                return self.answer(entry, 400, f"bad gzip body: {e}", "text/plain")
        entry["ids"] = ids_in(STATE.kind, body)
        with LOCK:
            fault = STATE.faults[0] if STATE.faults else None
            if fault:
                fault["count"] -= 1
                if fault["count"] <= 0:
                    STATE.faults.pop(0)
            for i in entry["ids"]:
                if i is not None:
                    STATE.rec(i)["attempts"] += 1
            max_body = STATE.max_body
        if fault:
            entry["fault"] = True
            ra = fault.get("retry_after")
            if ra and ra.startswith("date:"):
                ra = email.utils.formatdate(time.time() + float(ra[5:]), usegmt=True)
            ctype, fbody = fault_body(STATE.kind, fault["status"])
            if fault.get("body") is not None:
                fbody = fault["body"]
            return self.answer(entry, fault["status"], fbody, ctype, ra)
        if max_body is not None and len(raw) > max_body:
            if STATE.kind == "otlp":
                return self.answer(entry, 413, json.dumps({"code": 8, "message": "request body too large"}),
                                   "application/json")
            return self.answer(entry, 413, b"")
        getattr(self, "do_" + STATE.kind)(entry, body)

    # Grafana Loki ------------------------------------------------------------------------------
    def do_loki(self, entry, body):
        if self.path.split("?")[0] != "/loki/api/v1/push":
            return self.answer(entry, 404, "404 page not found\n", "text/plain")
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return self.answer(entry, 400, "loki stand-in: only application/json pushes are emulated",
                               "text/plain")
        try:
            req = json.loads(body)
            streams = req["streams"]
        except (ValueError, KeyError, TypeError) as e:
            return self.answer(entry, 400, f"loghttp.PushRequest: {e}", "text/plain")
        last_err = None
        with LOCK:
            for s in streams:
                labels = s.get("stream", {})
                if not labels or any(not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", k) for k in labels):
                    last_err = f"error parsing labels {labels}"
                    continue
                lk = loki_labels(labels)
                ignored, total, err = 0, len(s.get("values", [])), None
                for v in s.get("values", []):
                    ts, line = v[0], v[1]
                    if not (isinstance(ts, str) and ts.isdigit()):
                        ignored += 1
                        err = f"entry with timestamp {ts!r} ignored, reason: 'invalid timestamp'"
                        continue
                    if STATE.marker and STATE.marker in line:
                        ignored += 1
                        err = (f"entry with timestamp {ts} ignored, reason: 'Max entry size '256' bytes "
                               f"exceeded for stream '{lk}' while adding an entry with length "
                               f"'{len(line)}' bytes'")
                        continue
                    key = (lk, ts, line)
                    try:
                        rid = json.loads(line).get("event", {}).get("id")
                    except ValueError:
                        rid = None
                    if key in STATE.loki_keys:
                        STATE.duplicates += 1
                        continue
                    STATE.loki_keys.add(key)
                    r = STATE.rec(rid)
                    r["stored"] += 1
                    r["labels"] = labels
                    r["ts"] = ts
                    r["line"] = line
                if err:
                    last_err = f"{err},\nuser 'fake', total ignored: {ignored} out of {total} for stream: {lk}"
        if last_err:
            return self.answer(entry, 400, last_err, "text/plain; charset=utf-8")
        return self.answer(entry, 204)

    # Elasticsearch / OpenSearch ----------------------------------------------------------------
    def do_elastic(self, entry, body):
        if self.path.split("?")[0] != "/_bulk":
            return self.answer(entry, 400, json.dumps({"error": "no handler found for uri [" + self.path +
                                                       "] and method [POST]", "status": 400}),
                               "application/json")
        ct = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if ct not in ("application/x-ndjson", "application/json"):
            return self.answer(entry, 406, json.dumps({"error": f"Content-Type header [{ct}] is not supported",
                                                       "status": 406}), "application/json")
        text = body.decode("utf-8", "replace")
        if not text.endswith("\n"):
            return self.answer(entry, 400, json.dumps({"error": {
                "type": "illegal_argument_exception",
                "reason": "The bulk request must be terminated by a newline [\\n]"}, "status": 400}),
                "application/json")
        lines = text[:-1].split("\n")
        if len(lines) % 2:
            return self.answer(entry, 400, json.dumps({"error": {
                "type": "illegal_argument_exception", "reason": "Malformed action/metadata line"},
                "status": 400}), "application/json")
        items, errors = [], False
        with LOCK:
            for a, src in zip(lines[0::2], lines[1::2]):
                act = json.loads(a)
                op, meta = next(iter(act.items()))
                index, rid = meta.get("_index"), meta.get("_id")
                if op != "create":
                    return self.answer(entry, 400, json.dumps({"error": {
                        "type": "illegal_argument_exception", "reason": f"stand-in takes create only, not {op}"},
                        "status": 400}), "application/json")
                base = {"_index": index, "_id": rid}
                if STATE.item_429 > 0:
                    STATE.item_429 -= 1
                    errors = True
                    items.append({"create": dict(base, status=429, error={
                        "type": "es_rejected_execution_exception",
                        "reason": "rejected execution of coordinating operation [coordinating_and_primary_bytes=0, "
                                  "replica_bytes=0, all_bytes=0, coordinating_operation_bytes=1, "
                                  "max_coordinating_and_primary_bytes=0]"})})
                    continue
                if STATE.marker and STATE.marker in src:
                    errors = True
                    items.append({"create": dict(base, status=400, error={
                        "type": "mapper_parsing_exception",
                        "reason": "failed to parse field [marker] of type [long] in document with id '"
                                  + str(rid) + "'. Preview of field's value: '" + STATE.marker + "'",
                        "caused_by": {"type": "illegal_argument_exception",
                                      "reason": "For input string: \"" + STATE.marker + "\""}})})
                    continue
                if (index, rid) in STATE.es_docs or rid in STATE.preload:
                    errors = True
                    STATE.duplicates += 1
                    items.append({"create": dict(base, status=409, error={
                        "type": "version_conflict_engine_exception",
                        "reason": f"[{rid}]: version conflict, document already exists (current version [1])",
                        "index": index, "shard": "0", "index_uuid": "stand-in"})})
                    continue
                STATE.es_docs.add((index, rid))
                r = STATE.rec(rid)
                r["stored"] += 1
                r["index"] = index
                r["source"] = src
                items.append({"create": dict(base, _version=1, result="created", status=201,
                                             _shards={"total": 1, "successful": 1, "failed": 0},
                                             _seq_no=len(STATE.es_docs), _primary_term=1)})
        return self.answer(entry, 200, json.dumps({"took": 1, "errors": errors, "items": items}),
                           "application/json")

    # OpenTelemetry OTLP/HTTP logs --------------------------------------------------------------
    def do_otlp(self, entry, body):
        if self.path.split("?")[0] != "/v1/logs":
            return self.answer(entry, 404, "404 page not found\n", "text/plain")
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            return self.answer(entry, 415, json.dumps({"code": 3, "message": "415 unsupported media type, "
                                                       "supported: [application/json, application/x-protobuf]"}),
                               "application/json")
        try:
            req = json.loads(body)
            rls = req["resourceLogs"]
        except (ValueError, KeyError, TypeError) as e:
            return self.answer(entry, 400, json.dumps({"code": 3, "message": f"unmarshal: {e}"}),
                               "application/json")
        rejected = 0
        with LOCK:
            for rl in rls:
                res = otlp_attrs(rl.get("resource", {}).get("attributes", []))
                for sl in rl.get("scopeLogs", []):
                    scope = sl.get("scope", {}).get("name")
                    for r in sl.get("logRecords", []):
                        line = r.get("body", {}).get("stringValue", "")
                        if STATE.marker and STATE.marker in line:
                            rejected += 1
                            continue
                        attrs = otlp_attrs(r.get("attributes", []))
                        rec = STATE.rec(attrs.get("event.id"))
                        rec["stored"] += 1
                        rec["otlp"] = {"resource": res, "scope": scope, "attributes": attrs,
                                       "timeUnixNano": r.get("timeUnixNano"),
                                       "observedTimeUnixNano": r.get("observedTimeUnixNano"),
                                       "severityNumber": r.get("severityNumber"),
                                       "severityText": r.get("severityText"), "line": line}
        if rejected:
            return self.answer(entry, 200, json.dumps({"partialSuccess": {
                "rejectedLogRecords": str(rejected),
                "errorMessage": f"{rejected} log record(s) refused: body contains {STATE.marker!r}"}}),
                "application/json")
        return self.answer(entry, 200, "{}", "application/json")


class Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client closing a kept-alive connection (or one we cut) is not an error here.
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError, TimeoutError)):
            super().handle_error(request, client_address)


class DataServer(Quiet):
    allow_reuse_address = True
    tls = None

    def finish_request(self, request, client_address):
        if self.tls is not None:
            try:
                request.settimeout(10)
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as e:
                with LOCK:
                    STATE.tls_errors.append(str(e))
                return
        try:
            self.RequestHandlerClass(request, client_address, self)
        finally:
            if self.tls is not None:
                try:
                    request.close()
                except OSError:
                    pass


class Admin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, obj, status=200):
        b = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)

    def do_GET(self):
        if self.path == "/received":
            with LOCK:
                return self.reply({"records": STATE.records, "requests": STATE.requests,
                                   "duplicates": STATE.duplicates, "tls_errors": STATE.tls_errors})
        self.reply({"error": "not found"}, 404)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        arg = json.loads(self.rfile.read(n) or b"{}")
        if self.path == "/faults":
            with LOCK:
                STATE.faults.append(dict(arg))
        elif self.path == "/config":
            with LOCK:
                if "marker" in arg:
                    STATE.marker = arg["marker"]
                if "item_429" in arg:
                    STATE.item_429 = int(arg["item_429"])
                if "max_body" in arg:
                    STATE.max_body = arg["max_body"]
                if "preload" in arg:
                    STATE.preload |= set(arg["preload"])
        elif self.path == "/down":
            go_down(float(arg.get("seconds", 1)))
        elif self.path == "/reset":
            with LOCK:
                STATE.reset()
        else:
            return self.reply({"error": "not found"}, 404)
        self.reply({"ok": True})


def start_data(port, tls):
    srv = DataServer(("127.0.0.1", port), Handler)
    srv.tls = tls
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    DATA["server"] = srv
    return srv


def go_down(seconds):
    with LOCK:
        STATE.down = True
    srv = DATA["server"]
    port = srv.server_address[1]
    srv.shutdown()
    srv.server_close()

    def up():
        for _ in range(100):
            try:
                start_data(port, srv.tls)
                break
            except OSError:
                time.sleep(0.05)
        with LOCK:
            STATE.down = False

    threading.Timer(seconds, up).start()


def main():
    global STATE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", required=True, choices=["loki", "elastic", "otlp"])
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--client-ca")
    a = ap.parse_args()
    STATE = State(a.kind)
    tls = None
    if a.cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(a.cert, a.key)
        if a.client_ca:
            tls.verify_mode = ssl.CERT_REQUIRED
            tls.load_verify_locations(a.client_ca)
    data = start_data(0, tls)
    admin = Quiet(("127.0.0.1", 0), Admin)
    threading.Thread(target=admin.serve_forever, daemon=True).start()
    print(f"READY {data.server_address[1]} {admin.server_address[1]}", flush=True)
    # Live as long as whoever started us holds our standard input open.
    sys.stdin.read()
    os._exit(0)


if __name__ == "__main__":
    main()
