"""The search service's API reference as one self-contained HTML page, rendered on the server
from the app's own OpenAPI schema: no script and no CDN-hosted assets, so it works offline."""

from __future__ import annotations

import json
from html import escape
from typing import Any

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem;
       color: #1d232a; }
h2 { margin-top: 2.2rem; font-size: 1.05rem; font-family: ui-monospace, monospace; }
.method { display: inline-block; min-width: 3.6rem; padding: 0 .4rem; border-radius: 4px;
          color: #fff; background: #3b6fb6; }
.method.post { background: #2f8a57; }
table { border-collapse: collapse; width: 100%; margin: .4rem 0; }
td, th { border-top: 1px solid #dde3ea; padding: .3rem .5rem; text-align: left;
         vertical-align: top; }
code, pre { font-family: ui-monospace, monospace; font-size: 13px; }
pre { background: #f4f6f8; padding: .6rem; overflow-x: auto; border-radius: 6px; }
"""


def _type(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type(s, defs) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_type(schema.get('items', {}), defs)}"
    return str(schema.get("type", "any"))


def _example(p: dict[str, Any]) -> Any:
    schema = p.get("schema", {})
    for source in (p, schema):
        if "example" in source:
            return source["example"]
        if source.get("examples"):
            ex = source["examples"]
            return ex[0] if isinstance(ex, list) else next(iter(ex.values())).get("value")
    return schema.get("default")


def _fields(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    rows = []
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        ex = _example({"schema": prop})
        rows.append(
            f"<tr><td><code>{escape(name)}</code>{' (required)' if name in required else ''}"
            f"</td><td>{escape(_type(prop, defs))}</td>"
            f"<td>{escape(prop.get('description', ''))}</td>"
            f"<td>{'' if ex is None else '<code>' + escape(json.dumps(ex)) + '</code>'}</td></tr>"
        )
    head = "<tr><th>field</th><th>type</th><th>what</th><th>example</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def render(spec: dict[str, Any]) -> str:
    """The page: every path and method with its parameters, body and answers."""
    defs = spec.get("components", {}).get("schemas", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{escape(spec['info']['title'])}: API</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(spec['info']['title'])}: API</h1>",
        "<p>Every endpoint, its parameters with an example each, and what it answers. "
        "The machine-readable schema is <a href='/api/openapi.json'>/api/openapi.json</a>. "
        "Off loopback, send the service's token (<code>Authorization: Bearer …</code>).</p>",
    ]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            parts.append(
                f"<h2><span class='method {method}'>{method.upper()}</span> {escape(path)}</h2>"
            )
            if op.get("description") or op.get("summary"):
                parts.append(f"<p>{escape(op.get('description') or op.get('summary'))}</p>")
            params = op.get("parameters", [])
            if params:
                rows = []
                for p in params:
                    ex = _example(p)
                    rows.append(
                        f"<tr><td><code>{escape(p['name'])}</code> ({p['in']}"
                        f"{', required' if p.get('required') else ''})</td>"
                        f"<td>{escape(_type(p.get('schema', {}), defs))}</td>"
                        f"<td>{escape(p.get('description', ''))}</td><td>"
                        + ("" if ex is None else f"<code>{escape(json.dumps(ex))}</code>")
                        + "</td></tr>"
                    )
                head = "<tr><th>parameter</th><th>type</th><th>what</th><th>example</th></tr>"
                parts.append(f"<table>{head}{''.join(rows)}</table>")
            body = op.get("requestBody", {}).get("content", {})
            for kind, content in body.items():
                schema = content.get("schema", {})
                name = _type(schema, defs)
                parts.append(f"<p>Body: <code>{escape(kind)}</code>, {escape(name)}</p>")
                target = defs.get(name, schema)
                if target.get("properties"):
                    parts.append(_fields(target, defs))
                for ex in target.get("examples", [])[:1]:
                    parts.append(f"<pre>{escape(json.dumps(ex, indent=2))}</pre>")
            codes = ", ".join(
                f"{escape(c)} {escape(r.get('description', ''))}"
                for c, r in op.get("responses", {}).items()
            )
            parts.append(f"<p>Answers: {codes}</p>")
    for name, schema in defs.items():
        if name in ("ExampleIn",):
            parts.append(f"<h2>{escape(name)}</h2><p>{escape(schema.get('description', ''))}</p>")
            parts.append(_fields(schema, defs))
    parts.append("</body></html>")
    return "".join(parts)
