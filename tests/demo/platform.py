#!/usr/bin/env python3
"""Start/stop the Skolportalen demo platform: app.py behind nginx (TLS).

CLI
---
    python3 platform.py up   --dir D [--tls-port 8443] [--app-port 8081]
                             [--vulnerable] [--seed 7] [--timeout 30]
    python3 platform.py down --dir D
    python3 platform.py status --dir D

``up`` creates D, a self-signed certificate D/cert.pem + D/key.pem (openssl
CLI, CN=localhost, SAN DNS:localhost + IP:127.0.0.1) if missing, the dataset
D/dataset.json (app.py --dump-data, same seed) if missing, renders
nginx.conf.tmpl to D/nginx.conf, starts app.py and ``nginx -p D/ -c
D/nginx.conf -e D/logs/error.log`` (foreground master, own session, so they
outlive this command), waits until ``GET /api/test/bytes/1`` answers through
nginx over verified TLS, prints one JSON line

    {"nginx_master_pid":..,"app_pid":..,"tls_port":..,"app_port":..,"cert":..,
     "key":..,"dir":..,"dataset":..,"vulnerable":..,"seed":..}

and returns.  It is idempotent: if the same configuration is already up and
healthy it only prints the JSON again; a different configuration is stopped
first; stale pid files are removed.  ``down`` stops both (SIGTERM, then
SIGKILL after a timeout, nginx workers included) and removes the pid files.
Processes are recognised by pid files (D/app.pid, D/nginx.pid, D/state.json)
plus the environment variable SPARBAR_DEMO_DIR=D that ``up`` gives them, so
``down`` also finds instances whose pid files were lost.  Logs: D/logs/.

Library use (this file shadows the stdlib ``platform`` module when its
directory is on sys.path; it re-exports the stdlib module's functions so
that is harmless, but load it by path to be explicit):

    import importlib.util
    spec = importlib.util.spec_from_file_location("demo_platform", ".../tests/demo/platform.py")
    demo = importlib.util.module_from_spec(spec); spec.loader.exec_module(demo)
    info = demo.up("/tmp/demo", tls_port=18443, app_port=18081, vulnerable=True)
    ...
    demo.down("/tmp/demo")

Functions: up, down, status, ensure_cert, ensure_dataset, render_config,
start_app, start_nginx, wait_https, https_get.
"""

# --- stdlib shim: behave like the standard ``platform`` module if imported by
# that name (e.g. by uuid or pydoc when tests/demo is on sys.path).
import os as _os
import importlib.util as _ilu

_std = _os.path.join(_os.path.dirname(_os.__file__), "platform.py")
if _os.path.exists(_std) and _os.path.abspath(_std) != _os.path.abspath(__file__):
    _spec = _ilu.spec_from_file_location("_stdlib_platform", _std)
    _mod = _ilu.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    globals().update({k: v for k, v in vars(_mod).items() if not k.startswith("__")})
    del _spec, _mod
# --- end of shim

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import string  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
APP = os.path.join(HERE, "app.py")
TEMPLATE = os.path.join(HERE, "nginx.conf.tmpl")
ENV_TAG = "SPARBAR_DEMO_DIR"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class PlatformError(RuntimeError):
    pass


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------

def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _proc_state(pid):
    """Process state letter ('R', 'S', 'Z', ...) or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2]
    except (OSError, ValueError):
        return None


def _alive(pid):
    if not pid:
        return False
    st = _proc_state(pid)
    if st == "Z":
        _reap(pid)
        return False
    return st is not None


def _reap(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    except OSError:
        pass


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _tag(pid):
    """The demo directory a process belongs to: its SPARBAR_DEMO_DIR environment
    variable, else its working directory (nginx overwrites its environment
    block for the process title, but keeps the cwd it was started in)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(ENV_TAG.encode() + b"="):
                    return item.split(b"=", 1)[1].decode(errors="replace")
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        if comm == "nginx":
            return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        pass
    return None


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _is_app(pid, d):
    return _alive(pid) and "app.py" in _cmdline(pid) and _tag(pid) == d


def _is_nginx_master(pid, d):
    return _alive(pid) and _cmdline(pid).startswith("nginx: master") and _tag(pid) == d


def _tagged(d):
    """All live processes started by up() for directory d."""
    return [p for p in _all_pids() if p != os.getpid() and _tag(p) == d and _alive(p)]


def _stop(pids, sig=signal.SIGTERM, timeout=10.0):
    pids = [p for p in pids if _alive(p)]
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return []
        time.sleep(0.05)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return pids  # the ones that needed SIGKILL


def _port_free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------

def ensure_cert(d):
    """Self-signed EC P-256 certificate for localhost / 127.0.0.1 (kept if present)."""
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    if os.path.exists(cert) and os.path.exists(key):
        return cert, key
    os.makedirs(d, exist_ok=True)
    cmd = ["openssl", "req", "-x509", "-newkey", "ec",
           "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-keyout", key + ".tmp", "-out", cert + ".tmp", "-days", "3650",
           "-subj", "/CN=localhost",
           "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
           "-addext", "extendedKeyUsage=serverAuth"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise PlatformError("openssl failed: " + r.stderr.strip())
    os.chmod(key + ".tmp", 0o600)
    os.replace(key + ".tmp", key)
    os.replace(cert + ".tmp", cert)
    return cert, key


def ensure_dataset(d, seed=7):
    """D/dataset.json (app.py --dump-data) for this seed; regenerated if the seed differs."""
    path = os.path.join(d, "dataset.json")
    try:
        with open(path, encoding="utf-8") as f:
            if json.load(f).get("seed") == seed:
                return path
    except (OSError, ValueError):
        pass
    r = subprocess.run([sys.executable, APP, "--seed", str(seed), "--dump-data", path],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise PlatformError("app.py --dump-data failed: " + r.stderr.strip())
    return path


def _static(d):
    sd = os.path.join(d, "static")
    os.makedirs(sd, exist_ok=True)
    period = bytes(((7 * i) + (i >> 8)) & 0xFF for i in range(16384))
    files = {
        "hello.txt": b"Hej fr\xc3\xa5n Skolportalen! Static file for the benchmark.\n",
        "1k.bin": period[:1024],
        "16k.bin": period[:16384],
    }
    for name, content in files.items():
        p = os.path.join(sd, name)
        if not os.path.exists(p) or os.path.getsize(p) != len(content):
            with open(p, "wb") as f:
                f.write(content)


def render_config(d, tls_port, app_port, cert, key, user="root", h2_port=0):
    d = os.path.abspath(d)
    for sub in ("logs", "tmp", "static"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    _static(d)
    with open(TEMPLATE, encoding="utf-8") as f:
        tmpl = string.Template(f.read())
    h2_listen = f"listen {h2_port} ssl http2;" if h2_port else ""
    conf = tmpl.substitute(prefix=d, tls_port=tls_port, app_port=app_port,
                           cert=os.path.abspath(cert), key=os.path.abspath(key), user=user,
                           h2_listen=h2_listen)
    path = os.path.join(d, "nginx.conf")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(conf)
    os.replace(path + ".tmp", path)
    return path


# ---------------------------------------------------------------------------
# start / wait
# ---------------------------------------------------------------------------

def _env(d):
    env = dict(os.environ)
    env[ENV_TAG] = d
    env.pop("PYTHONPATH", None)
    return env


def start_app(d, app_port, vulnerable=False, seed=7, timeout=30.0, extra_args=()):
    """Start app.py on 127.0.0.1:app_port; returns its pid once it printed READY."""
    logs = os.path.join(d, "logs")
    os.makedirs(logs, exist_ok=True)
    out_path = os.path.join(logs, "app.out")
    cmd = [sys.executable, APP, "--port", str(app_port), "--host", "127.0.0.1",
           "--seed", str(seed)] + (["--vulnerable"] if vulnerable else []) + list(extra_args)
    with open(out_path, "wb") as out, open(os.path.join(logs, "app.err"), "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                cwd=d, env=_env(d), start_new_session=True, close_fds=True)
    with open(os.path.join(d, "app.pid"), "w") as f:
        f.write(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PlatformError(f"app.py exited with {proc.returncode}: "
                                + _tail(os.path.join(logs, "app.err")))
        with open(out_path, "rb") as f:
            if f"READY {app_port}".encode() in f.read():
                proc.returncode = 0  # detach: do not let Popen.__del__ care
                return proc.pid
        time.sleep(0.05)
    _stop([proc.pid])
    raise PlatformError("app.py did not print READY within %.0fs" % timeout)


def start_nginx(d, timeout=15.0):
    """Start the nginx master (foreground, own session); returns its pid."""
    conf = os.path.join(d, "nginx.conf")
    errlog = os.path.join(d, "logs", "error.log")
    base = [NGINX, "-p", d + "/", "-c", conf, "-e", errlog]
    r = subprocess.run(base + ["-t", "-q"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, env=_env(d))
    if r.returncode != 0:
        raise PlatformError("nginx -t failed: " + r.stdout.strip())
    pidfile = os.path.join(d, "nginx.pid")
    try:
        os.unlink(pidfile)
    except FileNotFoundError:
        pass
    with open(os.path.join(d, "logs", "nginx.out"), "wb") as out:
        proc = subprocess.Popen(base, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=d, env=_env(d),
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PlatformError(f"nginx exited with {proc.returncode}: " + _tail(errlog))
        if _read_int(pidfile) == proc.pid:
            proc.returncode = 0
            return proc.pid
        time.sleep(0.05)
    _stop([proc.pid])
    raise PlatformError("nginx did not write its pid file in time: " + _tail(errlog))


def _tail(path, n=800):
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode(errors="replace").strip()
    except OSError:
        return ""


def https_get(port, path, cafile, host="127.0.0.1", timeout=5.0):
    """(status, body) of one verified HTTPS GET."""
    ctx = ssl.create_default_context(cafile=cafile)
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_https(port, cafile, timeout=30.0, path="/api/test/bytes/1"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status, body = https_get(port, path, cafile)
            if status == 200 and len(body) == 1:
                return True
            last = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as e:
            last = repr(e)
        time.sleep(0.1)
    raise PlatformError(f"https://127.0.0.1:{port}{path} not ready: {last}")


# ---------------------------------------------------------------------------
# up / down / status
# ---------------------------------------------------------------------------

def _state_path(d):
    return os.path.join(d, "state.json")


def _load_state(d):
    try:
        with open(_state_path(d), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def status(d):
    """Current state: the JSON of up() plus "running" (both processes alive)."""
    d = os.path.abspath(d)
    st = _load_state(d) or {}
    app_pid = _read_int(os.path.join(d, "app.pid")) or st.get("app_pid")
    ngx_pid = _read_int(os.path.join(d, "nginx.pid")) or st.get("nginx_master_pid")
    st = dict(st)
    st["app_running"] = bool(app_pid and _is_app(app_pid, d))
    st["nginx_running"] = bool(ngx_pid and _is_nginx_master(ngx_pid, d))
    st["running"] = st["app_running"] and st["nginx_running"]
    st["stray_pids"] = sorted(set(_tagged(d)) - {app_pid, ngx_pid}
                              - set(_children(ngx_pid) if st["nginx_running"] else []))
    return st


def _children(pid):
    return [p for p in _all_pids() if _ppid(p) == pid]


def up(d, tls_port=8443, app_port=8081, vulnerable=False, seed=7, timeout=30.0,
       user="root", app_record=None, h2_port=0):
    d = os.path.abspath(d)
    os.makedirs(d, exist_ok=True)
    app_record = os.path.abspath(app_record) if app_record else None
    want = {"tls_port": tls_port, "app_port": app_port, "vulnerable": bool(vulnerable),
            "seed": seed, "app_record": app_record, "h2_port": h2_port}
    st = status(d)
    if st["running"] and all(st.get(k) == v for k, v in want.items()):
        try:
            wait_https(tls_port, st["cert"], timeout=min(timeout, 5.0))
            return _public(st)
        except PlatformError:
            pass
    down(d)  # different configuration, half-up, or stale: start from scratch
    for port in (tls_port, app_port, h2_port):
        if port and not _port_free(port):
            raise PlatformError(f"port {port} is in use by another process")
    cert, key = ensure_cert(d)
    dataset = ensure_dataset(d, seed)
    render_config(d, tls_port, app_port, cert, key, user=user, h2_port=h2_port)
    app_pid = start_app(d, app_port, vulnerable=vulnerable, seed=seed, timeout=timeout,
                        extra_args=(["--record", app_record] if app_record else []))
    try:
        ngx_pid = start_nginx(d, timeout=timeout)
        wait_https(tls_port, cert, timeout=timeout)
    except Exception:
        down(d)
        raise
    info = {"nginx_master_pid": ngx_pid, "app_pid": app_pid, "tls_port": tls_port,
            "app_port": app_port, "cert": cert, "key": key, "dir": d,
            "dataset": dataset, "vulnerable": bool(vulnerable), "seed": seed,
            "app_record": app_record, "h2_port": h2_port}
    with open(_state_path(d) + ".tmp", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    os.replace(_state_path(d) + ".tmp", _state_path(d))
    return info


def _public(st):
    keys = ("nginx_master_pid", "app_pid", "tls_port", "app_port", "cert", "key",
            "dir", "dataset", "vulnerable", "seed", "app_record")
    return {k: st.get(k) for k in keys}


def down(d, timeout=10.0):
    """Stop app and nginx of directory d; returns what was stopped."""
    d = os.path.abspath(d)
    st = _load_state(d) or {}
    stopped = {"nginx": [], "app": [], "killed": []}
    ngx = {p for p in (_read_int(os.path.join(d, "nginx.pid")), st.get("nginx_master_pid"))
           if p and _is_nginx_master(p, d)}
    ngx |= {p for p in _tagged(d) if _cmdline(p).startswith("nginx: master")}
    workers = {c for m in ngx for c in _children(m)}
    if ngx:
        stopped["nginx"] = sorted(ngx)
        stopped["killed"] += _stop(sorted(ngx), signal.SIGTERM, timeout)
        _stop(sorted(workers), signal.SIGKILL, 2.0)  # normally gone with the master
    apps = {p for p in (_read_int(os.path.join(d, "app.pid")), st.get("app_pid"))
            if p and _is_app(p, d)}
    apps |= {p for p in _tagged(d) if "app.py" in _cmdline(p)}
    if apps:
        stopped["app"] = sorted(apps)
        stopped["killed"] += _stop(sorted(apps), signal.SIGTERM, timeout)
    # anything else we started (e.g. nginx workers orphaned by a SIGKILLed master)
    rest = [p for p in _tagged(d) if _comm(p) == "nginx" or "app.py" in _cmdline(p)]
    if rest:
        stopped["killed"] += rest
        _stop(rest, signal.SIGKILL, 2.0)
    for name in ("app.pid", "nginx.pid", "state.json"):
        try:
            os.unlink(os.path.join(d, name))
        except FileNotFoundError:
            pass
    return stopped


def main(argv=None):
    ap = argparse.ArgumentParser(description="Skolportalen demo platform (app.py + nginx TLS)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start (idempotent) and print JSON")
    p_up.add_argument("--dir", required=True)
    p_up.add_argument("--tls-port", type=int, default=8443)
    p_up.add_argument("--app-port", type=int, default=8081)
    p_up.add_argument("--vulnerable", action="store_true")
    p_up.add_argument("--seed", type=int, default=7)
    p_up.add_argument("--timeout", type=float, default=30.0)
    p_up.add_argument("--user", default="root", help="nginx worker user")
    p_up.add_argument("--h2-port", type=int, default=0,
                      help="a second TLS port offering HTTP/2 (ALPN h2); 0: none")
    p_up.add_argument("--app-record", metavar="FILE",
                      help="app.py --record FILE: one JSON line per request the app answered")
    p_down = sub.add_parser("down", help="stop and clean up")
    p_down.add_argument("--dir", required=True)
    p_st = sub.add_parser("status", help="print state JSON")
    p_st.add_argument("--dir", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "up":
            out = up(args.dir, args.tls_port, args.app_port, args.vulnerable, args.seed,
                     args.timeout, args.user, args.app_record, args.h2_port)
        elif args.cmd == "down":
            out = down(args.dir)
        else:
            out = status(args.dir)
    except PlatformError as e:
        print(f"platform.py: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
