#!/usr/bin/env python3
"""`cargo xtask lint`'s house check: the module import graph of a crate's src/ (each .rs file a
module, tests and comments left out; a submodule's use of its own ancestors is not counted) has
no cycles, and the pure modules named after the crate
root (argv[3:]) never reach, directly or through others, a module that uses aya.

    module_graph.py SRC_DIR crate [PURE_TOP_LEVEL_MODULE...]

Exits 1 and names the cycle or the path otherwise."""
import re, sys, pathlib
root = pathlib.Path(sys.argv[1]); crate = sys.argv[2] if len(sys.argv) > 2 else 'crate'
mods = {}
for p in root.rglob('*.rs'):
    rel = p.relative_to(root).with_suffix('')
    parts = list(rel.parts)
    if parts[-1] in ('mod', 'lib', 'main'): parts = parts[:-1]
    if p.name in ('tests.rs',) or p.name.endswith('_tests.rs'): continue
    mods[tuple(parts)] = p
def resolve(cur, path):
    segs = path.split('::')
    if segs[0] == 'crate': base = []; segs = segs[1:]
    elif segs[0] == 'super':
        base = list(cur[:-1]); segs = segs[1:]
        while segs and segs[0] == 'super': base = base[:-1]; segs = segs[1:]
    elif segs[0] == 'self': base = list(cur); segs = segs[1:]
    else: return None
    best = None
    for i in range(len(segs) + 1):
        t = tuple(base + segs[:i])
        if t in mods: best = t
    return best
def paths_in_use(text):
    out = []
    for m in re.finditer(r'\buse\s+((?:crate|super|self)(?:::\w+)*)::\{', text):
        start = m.end(); depth = 1; j = start
        while depth:
            if text[j] == '{': depth += 1
            elif text[j] == '}': depth -= 1
            j += 1
        body = text[start:j-1]
        def walk(prefix, body):
            items, d, cur = [], 0, ''
            for ch in body:
                if ch == '{': d += 1
                if ch == '}': d -= 1
                if ch == ',' and d == 0: items.append(cur); cur = ''
                else: cur += ch
            items.append(cur)
            for it in items:
                it = it.strip()
                if not it: continue
                mm = re.match(r'([\w:]+?)::\{(.*)\}$', it, re.S)
                if mm: walk(prefix + '::' + mm.group(1), mm.group(2))
                else: out.append(prefix + '::' + re.split(r'\s+as\s+', it)[0].strip())
        walk(m.group(1), body)
    for m in re.finditer(r'\b((?:crate|super|self)(?:::\w+)+)', text):
        out.append(m.group(1))
    return out
def strip_tests(t):
    """The text without its `#[cfg(test)]` items: a `mod x;` declaration, or an item up to
    its matching closing brace."""
    out, i = '', 0
    while True:
        k = t.find('#[cfg(test)]', i)
        if k < 0: return out + t[i:]
        out += t[i:k]
        j = k + len('#[cfg(test)]')
        semi, brace = t.find(';', j), t.find('{', j)
        if brace < 0 or (0 <= semi < brace):
            i = semi + 1
            continue
        depth, j = 1, brace + 1
        while depth and j < len(t):
            if t[j] == '{': depth += 1
            elif t[j] == '}': depth -= 1
            j += 1
        i = j
edges = {}
for cur, p in mods.items():
    t = strip_tests(p.read_text())
    t = '\n'.join(l for l in t.split('\n') if not l.lstrip().startswith('//'))
    for path in paths_in_use(t):
        r = resolve(cur, path)
        # A submodule using its own ancestor (the methods of `impl Parent` split over files,
        # `super::Type`) is part of that module, not a dependency back up.
        if r is not None and r != cur and cur[:len(r)] != r:
            edges.setdefault(cur, set()).add(r)
# Tarjan
idx, low, st, on, sccs, n = {}, {}, [], set(), [], [0]
def sc(v):
    idx[v] = low[v] = n[0]; n[0] += 1; st.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in idx: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        comp = []
        while True:
            w = st.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(comp)
sys.setrecursionlimit(10000)
for v in mods:
    if v not in idx: sc(v)
name = lambda t: '::'.join(t) or '(root)'
if not sccs: print('no cycles among', len(mods), 'modules')
for c in sccs:
    print('cycle:', ', '.join(sorted(name(x) for x in c)))
    for a in c:
        for b in edges.get(a, ()):
            if b in c: print('   ', name(a), '->', name(b))
# Pure logic must not reach a module that uses aya (argv[3:]: the pure top-level modules).
pure = sys.argv[3:]
if pure:
    aya = {m for m, p in mods.items() if re.search(r'\baya(_log)?::|\buse aya\b', p.read_text().split('#[cfg(test)]')[0])}
    bad = 0
    for m in mods:
        if not m or m[0] not in pure: continue
        seen, todo = set(), [m]
        while todo:
            v = todo.pop()
            for w in edges.get(v, ()):
                if w not in seen: seen.add(w); todo.append(w)
        hit = sorted(name(x) for x in seen & aya)
        if hit: bad += 1; print('pure', name(m), 'reaches aya through', hit)
    print('aya modules:', sorted(name(x) for x in aya), '; pure modules reaching them:', bad)
    if bad: sys.exit(1)
if sccs: sys.exit(1)
