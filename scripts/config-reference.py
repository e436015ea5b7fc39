#!/usr/bin/env python3
"""Rewrites the settings table in docs/configuration.md from SETTINGS in
src/config/table.rs (a unit test checks that the two agree)."""
import re, pathlib
root = pathlib.Path(__file__).resolve().parent.parent
src = (root / "src/config/table.rs").read_text()
rows = re.findall(r'Setting \{\s*name: "([a-z0-9_]+)",\s*default: (None|Some\("([^"]*)"\)),\s*secret: (true|false),\s*doc: "((?:[^"\\]|\\.)*)",?\s*\}', src)
table = ["| Setting (TOML key) | Environment variable | Default | Meaning |", "|---|---|---|---|"]
for name, _, default, secret, doc in rows:
    dv = f"`{default}`" if default else "—"
    if name == "database_url": dv = "(required)"
    if name == "master_key": dv = "(required by the `env` provider)"
    doc = doc.replace('\\"', '"') + (" Secret: never logged." if secret == "true" else "")
    table.append(f"| `{name}` | `KEYWARD_{name.upper()}` | {dv} | {doc} |")
path = root / "docs/configuration.md"
lines = path.read_text().split("\n")
start = next(i for i, l in enumerate(lines) if l.startswith("| Setting (TOML key)"))
end = start
while end < len(lines) and lines[end].startswith("|"):
    end += 1
lines[start:end] = table
path.write_text("\n".join(lines))
print(f"{len(rows)} settings")
