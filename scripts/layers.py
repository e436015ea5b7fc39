#!/usr/bin/env python3
"""Keeps src/lib.rs's layer picture true of the imports.

    scripts/layers.py            # exit 1 on an upward import or an import circle
    scripts/layers.py --graph    # also print every file's imports

It reads every `use` line and every inline `crate::…` / `super::…` path of the
library's source files (tests inside a file, `#[cfg(test)] mod tests`, are left
out: a test may reach anything), resolves each to the file that defines the
module it names (following `pub use` re-exports), and checks two rules:

1. A file imports only files of its own layer or of a lower one (LAYERS below,
   lowest first).
2. No circle between files. Where two files are honestly one unit, ONE_UNIT
   names the pair and says why.

Standard library only; run by scripts/test before the build.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")

# Lowest first. A file belongs to the first layer with a matching prefix (a
# module path such as "domain::service", matched on whole segments).
LAYERS = [
    ("vocabulary", ["domain::ids", "domain::time", "domain::states", "domain::records",
                    "domain::algorithm",
                    "json", "owner_only", "secret_cell"]),
    ("crypto", ["crypto"]),
    ("store and providers", ["store", "master_key"]),
    ("domain", ["domain"]),
    ("audit", ["audit"]),
    ("http", ["http"]),
    ("entry", ["lib", "main", "allocator", "acme", "cli", "client", "client_ca", "config", "startup",
               "server", "tls", "dev", "telemetry", "fuzzing", "memory"]),
]

# Imports that the ranks allow but the design does not: handlers reach the
# store only through the domain, which offers the views and queries they need.
FORBIDDEN = [("http", "store")]

# Pairs of files that import each other because they are one idea cut in two
# for size. Each needs its reason here; none is needed today.
ONE_UNIT = {}

STRIP_TESTS = re.compile(r"^#\[cfg\(test\)\]\s*\n\s*(pub(\(\w+\))?\s+)?mod\s+\w+\s*\{", re.M)


def module_of(path):
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    if rel in (["lib"], ["main"]):
        return []
    return rel


def file_of(mod):
    """The file that defines module `mod` (a list of segments), or None."""
    if not mod:
        return os.path.join(SRC, "lib.rs")
    for cand in (os.path.join(SRC, *mod) + ".rs", os.path.join(SRC, *mod, "mod.rs")):
        if os.path.isfile(cand):
            return cand
    return None


CHAR = re.compile(r"'(\\(x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)|[^\\'])'")
RAW = re.compile(r'b?r(#*)"')


def lex(text):
    """Source with comments removed and every string and char literal emptied,
    scanned in one pass so that `"http://..."` is a string, not a comment."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif (c in "rb") and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")) \
                and RAW.match(text, i):
            m = RAW.match(text, i)
            end = text.find('"' + m.group(1), m.end())
            out.append('""')
            i = n if end < 0 else end + 1 + len(m.group(1))
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            out.append('""')
            i += 1
        elif c == "'" and CHAR.match(text, i):
            out.append("' '")
            i = CHAR.match(text, i).end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def strip(text):
    """Source without comments, literals and test modules."""
    text = lex(text)
    # Every test module (a file may hold more than one), each to its
    # matching brace.
    while m := STRIP_TESTS.search(text):
        depth, i = 0, m.end() - 1
        while i < len(text):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        text = text[: m.start()] + text[i + 1:]
    return text


def expand(tree):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e] (`self` in braces kept)."""
    tree = re.sub(r"\s+", "", tree)
    if "{" not in tree:
        return [tree]
    i = tree.index("{")
    prefix = tree[:i]
    inner = tree[i + 1: tree.rindex("}")]
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    if cur:
        parts.append(cur)
    out = []
    for p in parts:
        for e in expand(p):
            out.append(prefix + e if e != "self" else prefix.rstrip(":"))
    return out


USE = re.compile(r"\b(pub(\([\w:]+\))?\s+)?use\s+([^;]+);")
INLINE = re.compile(r"(?<![\w:])((?:crate|super)(?:::\w+)+)")

_exports = {}


def reexports(path):
    """name -> absolute path (segments) for each `pub use` of the file."""
    if path in _exports:
        return _exports[path]
    _exports[path] = {}
    text = strip(open(path, encoding="utf-8").read())
    here = module_of(path)
    for m in USE.finditer(text):
        if not m.group(1):
            continue
        for p in expand(m.group(3)):
            p = re.sub(r"\s+as\s+\w+$", "", p)
            segs = absolute(p.split("::"), here)
            if segs and segs[-1] != "*":
                _exports[path][segs[-1]] = segs
    return _exports[path]


def absolute(segs, here):
    """Path segments made absolute from module `here`, or None (another crate)."""
    segs = [s for s in segs if s]
    if not segs:
        return None
    if segs[0] == "crate":
        return segs[1:]
    if segs[0] == "self":
        return here + segs[1:]
    if segs[0] == "super":
        base = list(here)
        while segs and segs[0] == "super":
            base = base[:-1]
            segs = segs[1:]
        return base + segs
    if file_of(here + segs[:1]):
        return here + segs
    return None


def resolve(segs, depth=0):
    """The file a path lands in: the deepest module file, then re-exports."""
    for n in range(len(segs), -1, -1):
        f = file_of(segs[:n])
        if f:
            rest = segs[n:]
            if rest and depth < 8:
                target = reexports(f).get(rest[0])
                if target and target != segs[: n + 1]:
                    return resolve(target + rest[1:], depth + 1)
            return f
    return None


def layer_of(mod):
    name = "::".join(mod) or "lib"
    for rank, (layer, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if name == p or name.startswith(p + "::"):
                return rank, layer
    return None, None


def imports(path):
    here = module_of(path)
    text = strip(open(path, encoding="utf-8").read())
    found = set()
    paths = []
    for m in USE.finditer(text):
        paths.extend(expand(m.group(3)))
    paths.extend(INLINE.findall(text))
    # Inline paths through a child module declared here (`mod x;` then `x::f()`).
    for child in re.findall(r"\bmod\s+(\w+)\s*;", text):
        paths.extend(re.findall(r"(?<![\w:])(" + child + r"(?:::\w+)+)", text))
    for p in paths:
        p = re.sub(r"\s+as\s+\w+$", "", p)
        segs = absolute(p.split("::"), here)
        if segs is None:
            continue
        target = resolve([s for s in segs if s != "*"])
        if target and target != path:
            found.add(target)
    return found


def sccs(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main():
    files = []
    for d, _, names in os.walk(SRC):
        files += [os.path.join(d, n) for n in names if n.endswith(".rs")]
    files.sort()
    rel = lambda f: os.path.relpath(f, ROOT)
    graph = {f: sorted(imports(f)) for f in files}
    problems = []
    for f in files:
        rank, layer = layer_of(module_of(f) or ["lib" if f.endswith("lib.rs") else "main"])
        if rank is None:
            problems.append(f"{rel(f)}: in no layer (add it to LAYERS in scripts/layers.py)")
            continue
        for t in graph[f]:
            trank, tlayer = layer_of(module_of(t) or ["lib"])
            if trank is not None and trank > rank:
                problems.append(f"{rel(f)} ({layer}) imports {rel(t)} ({tlayer}): upward")
            src_top, dst_top = (module_of(f) or ["lib"])[0], (module_of(t) or ["lib"])[0]
            if (src_top, dst_top) in FORBIDDEN:
                problems.append(f"{rel(f)} imports {rel(t)}: {src_top} goes through the domain")
    for comp in sccs(graph):
        if len(comp) < 2:
            continue
        names = sorted(rel(f) for f in comp)
        if len(names) == 2 and tuple(names) in ONE_UNIT:
            continue
        sub = {f: [t for t in graph[f] if t in comp] for f in comp}
        edges = "; ".join(f"{rel(f)} -> {', '.join(rel(t) for t in sub[f])}" for f in sorted(comp))
        problems.append(f"import circle of {len(comp)} files: {edges}")
    if "--graph" in sys.argv:
        for f in files:
            print(rel(f), "->", ", ".join(rel(t) for t in graph[f]))
    for p in problems:
        print("layers:", p)
    if problems:
        print(f"layers: {len(problems)} problem(s); the layers are described in src/lib.rs")
        return 1
    print(f"layers: {len(files)} files, no upward import, no circle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
