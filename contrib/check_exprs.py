#!/usr/bin/env python3
"""Checks that the dashboard and alert rules name only metrics and labels the broker exports.

Usage: check_exprs.py METRICS_RS DASHBOARD_JSON [ALERTS_YML]

Metric names and label names come from src/metrics.rs; histograms add _bucket/_sum/_count
and the `le` label. Also allowed: `up` and the process_* metrics of the prometheus crate's
ProcessCollector, and the target labels job, instance and hub (scrape.yml). A PromQL
expression is reduced (strings, matchers, ranges and grouping clauses removed) to the bare
names it selects, so a typo in a metric or label name fails here instead of drawing an
empty panel or an alert that can never fire. Exits 1 on any problem.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

# The prometheus crate's process collector (src/process_collector.rs, namespace "").
PROCESS_METRICS = {
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
}
TARGET_LABELS = {"job", "instance", "hub"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
TOKEN = re.compile(r"(\d[\w.]*)|([A-Za-z_:][\w:]*)(\s*\()?")


def exported(metrics_rs: str) -> dict[str, set[str]]:
    """Every exported series name with the labels it carries."""
    names: dict[str, set[str]] = {}
    for m in re.finditer(r'"(tunnelbot_\w+)",\s*"[^"]*",?\s*(?:&\[([^\]]*)\])?', metrics_rs):
        names[m.group(1)] = set(re.findall(r'"(\w+)"', m.group(2) or ""))
    for h in re.findall(r'histogram\(\s*"(tunnelbot_\w+)"', metrics_rs):
        labels = names.pop(h, set())
        names[h + "_bucket"] = labels | {"le"}
        names[h + "_sum"] = set(labels)
        names[h + "_count"] = set(labels)
    for p in PROCESS_METRICS:
        names[p] = set()
    names["up"] = set()
    return names


def check_expr(expr: str, known: dict[str, set[str]]) -> list[str]:
    """Problems in one PromQL expression (empty when it names only known things)."""
    problems = []
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables such as $__rate_interval
    bare = STRING.sub('""', expr)
    used: set[str] = set()
    matcher_labels: list[tuple[str | None, str]] = []
    for m in SELECTOR.finditer(bare):
        for label in re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", m.group(2)):
            matcher_labels.append((m.group(1), label))
    bare = SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", bare)
    grouping = [g.strip() for m in GROUPING.finditer(bare) for g in m.group(2).split(",")]
    bare = GROUPING.sub(" ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    for number, name, call in TOKEN.findall(bare):
        if number or call or not name or name.lower() in KEYWORDS:
            continue
        used.add(name)
    if not used:
        problems.append(f"no metric name found in {expr!r}")
    labels_in_scope = set(TARGET_LABELS)
    for name in sorted(used):
        if name in known:
            labels_in_scope |= known[name]
        else:
            problems.append(f"unknown metric {name!r}")
    for metric, label in matcher_labels:
        allowed = TARGET_LABELS | known.get(metric or "", labels_in_scope)
        if metric in known and label not in allowed:
            problems.append(f"{metric} has no label {label!r}")
    for label in filter(None, grouping):
        if label not in labels_in_scope:
            problems.append(f"grouping by unknown label {label!r}")
    return problems


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and templating query."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                if "expr" in t:
                    out.append((f"panel {p.get('title')!r}/{t.get('refId')}", t["expr"]))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q)
        if m:
            out.append((f"variable {v.get('name')!r}", m.group(1)))
    return out


def check_dashboard(dash: dict[str, Any]) -> list[str]:
    """Structure: schema version, the datasource input, ids, grid positions, datasources."""
    problems = []
    if int(dash.get("schemaVersion", 0)) < 36:
        problems.append(f"schemaVersion {dash.get('schemaVersion')} < 36")
    if not any(i.get("name") == "DS_PROMETHEUS" for i in dash.get("__inputs", [])):
        problems.append("no DS_PROMETHEUS datasource input")
    seen: set[Any] = set()

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            title = p.get("title")
            if p.get("id") in seen:
                problems.append(f"panel {title!r}: duplicate id {p.get('id')}")
            seen.add(p.get("id"))
            if not {"h", "w", "x", "y"} <= set(p.get("gridPos", {})):
                problems.append(f"panel {title!r}: incomplete gridPos")
            if p.get("type") == "row":
                continue
            if not p.get("targets"):
                problems.append(f"panel {title!r}: no targets")
            for obj in [p, *p.get("targets", [])]:
                uid = obj.get("datasource", {}).get("uid")
                if uid != "${DS_PROMETHEUS}":
                    problems.append(f"panel {title!r}: datasource uid {uid!r}")

    walk(dash.get("panels", []))
    return problems


def alert_rules(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(where, expr) for every rule, and the alerts missing an annotation or a severity."""
    import yaml  # type: ignore[import-untyped]  # PyYAML: python3-yaml on Debian

    doc = yaml.safe_load(path.read_text())
    exprs, problems = [], []
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            if rule.get("alert"):
                for key in ("summary", "description"):
                    if not rule.get("annotations", {}).get(key):
                        problems.append(f"alert {name!r}: no {key} annotation")
                if not rule.get("labels", {}).get("severity"):
                    problems.append(f"alert {name!r}: no severity label")
            exprs.append((f"rule {name!r}", str(rule.get("expr", ""))))
    return exprs, problems


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    known = exported(Path(argv[1]).read_text())
    ours = [n for n in known if n.startswith("tunnelbot_")]
    if len(ours) < 10:
        print(f"only {len(ours)} tunnelbot_ metrics found in {argv[1]}: parser out of date?")
        return 1
    dash = json.loads(Path(argv[2]).read_text())
    problems = [f"dashboard: {p}" for p in check_dashboard(dash)]
    exprs = [("dashboard " + w, e) for w, e in dashboard_exprs(dash)]
    if len(argv) == 4:
        rules, rule_problems = alert_rules(Path(argv[3]))
        exprs += [("alerts " + w, e) for w, e in rules]
        problems += [f"alerts {p}" for p in rule_problems]
    if not exprs:
        problems.append("no expressions found")
    used: set[str] = set()
    for where, expr in exprs:
        for p in check_expr(expr, known):
            problems.append(f"{where}: {p}")
        used |= set(re.findall(r"tunnelbot_\w+", expr))
    for p in problems:
        print(f"   FAIL {p}")
    def family(name: str) -> str:
        return re.sub(r"_(bucket|sum|count)$", "", name)

    families = {family(n) for n in ours}
    covered = {family(n) for n in used if n in known}
    unused = sorted(families - covered)
    if unused:
        print(f"   note exported but on no panel or rule: {', '.join(unused)}")
    print(f"   {len(exprs)} expressions; {len(covered)} of {len(families)} tunnelbot metrics used; "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
