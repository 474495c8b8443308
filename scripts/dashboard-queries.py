#!/usr/bin/env python3
"""Prints the PromQL of vtw-serve's Grafana dashboard and Prometheus rules, one per line.

For integration tests that run every query against a live Prometheus scraping a loaded
vtw-server and expect data back. Python 3 standard library only (PyYAML is used for
rules.yml when installed; otherwise a small parser for the subset rules.yml uses).

  scripts/dashboard-queries.py                  dashboard panel queries (default)
  scripts/dashboard-queries.py --rules          recording-rule expressions of rules.yml
  scripts/dashboard-queries.py --alerts         alerting-rule expressions of rules.yml
  scripts/dashboard-queries.py --metrics        metric names the server must expose
  scripts/dashboard-queries.py --tsv ...        prefix each line with its source and a tab

Grafana variables are replaced so the queries run as they are:
  $namespace -> --namespace (default .*)      $job -> --job (default vtw-serve)
  $instance -> --instance (default .+)        $__rate_interval -> --rate-interval (1m)
  $__range -> --range (5m)                    $__interval -> --interval (15s)
--raw keeps them. Multi-line expressions are joined into one line.
"""

import argparse
import json
import os
import re
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(REPO, "deploy", "grafana", "vtw-serve.json")
RULES = os.path.join(REPO, "deploy", "prometheus", "rules.yml")
METRICS = os.path.join(REPO, "deploy", "prometheus", "metrics.txt")

_VAR = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def one_line(expr):
    """Joins a multi-line expression; whitespace inside a line is kept as is."""
    return " ".join(part.strip() for part in expr.splitlines() if part.strip())


def substitute(expr, values):
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise SystemExit(f"dashboard-queries: unknown Grafana variable ${name} in: {expr}")
        return values[name]
    return _VAR.sub(repl, expr)


def walk_panels(panels):
    for p in panels:
        yield p
        # Collapsed rows keep their panels inside the row.
        yield from walk_panels(p.get("panels") or [])


def dashboard_queries(path):
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    out = []
    for p in walk_panels(dash.get("panels") or []):
        for t in p.get("targets") or []:
            expr = (t.get("expr") or "").strip()
            if expr:
                src = f"panel {p.get('id')} {t.get('refId', '?')}: {p.get('title', '')}"
                out.append((src, one_line(expr)))
    return out


def _rules_with_pyyaml(text):
    import yaml  # noqa: PLC0415 (optional dependency)
    doc = yaml.safe_load(text)
    out = []
    for g in doc.get("groups") or []:
        for r in g.get("rules") or []:
            kind = "record" if "record" in r else "alert"
            out.append((kind, r[kind], one_line(str(r["expr"]))))
    return out


def _rules_subset_parser(text):
    """Parses the `- record:/alert: NAME` ... `expr:` items of a Prometheus rules file.

    Handles plain, quoted and block (|, |-, >, >-) expr scalars, which covers what
    rules.yml uses; anything fancier needs PyYAML.
    """
    lines = text.splitlines()
    item = re.compile(r"^(\s*)- (record|alert):\s*(.+?)\s*$")
    out = []
    i = 0
    while i < len(lines):
        m = item.match(lines[i])
        if not m:
            i += 1
            continue
        col = len(m.group(1)) + 2
        kind, name = m.group(2), m.group(3).strip("'\"")
        expr_re = re.compile(r"^ {%d}expr:\s*(.*?)\s*$" % col)
        j = i + 1
        expr = None
        while j < len(lines):
            line = lines[j]
            if item.match(line) or (line.strip() and len(line) - len(line.lstrip()) < col):
                break
            em = expr_re.match(line)
            if em:
                value = em.group(1)
                body = []
                k = j + 1
                while k < len(lines) and (not lines[k].strip()
                                          or len(lines[k]) - len(lines[k].lstrip()) > col):
                    body.append(lines[k])
                    k += 1
                if value in ("|", "|-", "|+", ">", ">-", ">+"):
                    expr = "\n".join(body)
                elif value[:1] in ("'", '"'):
                    full = " ".join([value] + [b.strip() for b in body if b.strip()])
                    if full[0] == '"':
                        expr = json.loads(full)
                    else:
                        expr = full[1:-1].replace("''", "'")
                else:
                    expr = "\n".join([value] + body)
                break
            j += 1
        if expr is None:
            raise SystemExit(f"dashboard-queries: no expr for {kind} {name}")
        out.append((kind, name, one_line(expr)))
        i = j + 1
    return out


def rules_exprs(path, use_yaml=True):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if use_yaml:
        try:
            return _rules_with_pyyaml(text)
        except ImportError:
            pass
    return _rules_subset_parser(text)


def metric_names(path):
    names = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].split()
            if line:
                names.append(line[0])
    return names


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--rules", action="store_true", help="recording-rule expressions")
    what.add_argument("--alerts", action="store_true", help="alerting-rule expressions")
    what.add_argument("--metrics", action="store_true", help="metric names from metrics.txt")
    ap.add_argument("--dashboard", default=DASHBOARD)
    ap.add_argument("--rules-file", default=RULES)
    ap.add_argument("--metrics-file", default=METRICS)
    ap.add_argument("--tsv", action="store_true", help="print SOURCE<TAB>EXPR")
    ap.add_argument("--raw", action="store_true", help="keep Grafana variables")
    ap.add_argument("--namespace", default=".*")
    ap.add_argument("--job", default="vtw-serve")
    ap.add_argument("--instance", default=".+")
    ap.add_argument("--rate-interval", default="1m")
    ap.add_argument("--range", default="5m")
    ap.add_argument("--interval", default="15s")
    ap.add_argument("--no-yaml", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.metrics:
        for n in metric_names(args.metrics_file):
            print(n)
        return 0
    if args.rules or args.alerts:
        want = "record" if args.rules else "alert"
        rows = [(f"{k} {n}", e) for k, n, e in rules_exprs(args.rules_file, not args.no_yaml)
                if k == want]
    else:
        values = {
            "namespace": args.namespace, "job": args.job, "instance": args.instance,
            "__rate_interval": args.rate_interval, "__range": args.range,
            "__interval": args.interval,
            # Used only as the datasource uid, never inside a query; kept for completeness.
            "datasource": "prometheus",
        }
        rows = dashboard_queries(args.dashboard)
        if not args.raw:
            rows = [(s, substitute(e, values)) for s, e in rows]
    for src, expr in rows:
        print(f"{src}\t{expr}" if args.tsv else expr)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet under `| head`
    sys.exit(main())
