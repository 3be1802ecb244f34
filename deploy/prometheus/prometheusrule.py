#!/usr/bin/env python3
"""Write taskmeter-rules.yml as a Prometheus Operator ``PrometheusRule`` manifest.

    python deploy/prometheus/prometheusrule.py > deploy/prometheus/prometheusrule.yaml
    python deploy/prometheus/prometheusrule.py --namespace monitoring \\
        --label release=kube-prometheus-stack | kubectl apply -f -

The groups are copied as text (comments kept), so the manifest holds exactly the rules
that ``promtool`` checks and tests; tests/test_rules.py fails when the committed
prometheusrule.yaml is not this script's default output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "taskmeter-rules.yml"
MANIFEST = HERE / "prometheusrule.yaml"
DEFAULT_LABELS = {"app.kubernetes.io/name": "taskmeter", "app.kubernetes.io/component": "rules"}


def groups_text(rules_text: str) -> str:
    """The rules file from its ``groups:`` line on (the header comment dropped)."""
    lines = rules_text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("groups:"):
            return "\n".join(lines[i:]) + "\n"
    raise ValueError("no top-level 'groups:' in the rules file")


def render(
    rules_text: str,
    name: str = "taskmeter",
    namespace: str | None = None,
    labels: dict[str, str] | None = None,
) -> str:
    # Values quoted (JSON strings are YAML strings): `--label v=1.0` or `team=yes` must
    # stay strings, or Kubernetes refuses the manifest.
    meta = [f"  name: {json.dumps(name)}"]
    if namespace:
        meta.append(f"  namespace: {json.dumps(namespace)}")
    meta.append("  labels:")
    meta += [
        f"    {k}: {json.dumps(v)}" for k, v in {**DEFAULT_LABELS, **(labels or {})}.items()
    ]
    body = "".join(f"  {line}\n" if line else "\n" for line in groups_text(rules_text).splitlines())
    return (
        "# Generated from taskmeter-rules.yml by prometheusrule.py: edit the rules file, then\n"
        "#   python deploy/prometheus/prometheusrule.py > deploy/prometheus/prometheusrule.yaml\n"
        "# Your Prometheus's ruleSelector may need a label (e.g. --label release=NAME).\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n" + "\n".join(meta) + "\n"
        "spec:\n" + body
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="taskmeter", help="metadata.name (default taskmeter)")
    ap.add_argument("--namespace", help="metadata.namespace (default: none, kubectl's)")
    ap.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE",
        help="an extra metadata label, e.g. release=kube-prometheus-stack (repeatable)",
    )  # fmt: skip
    ap.add_argument("--rules", type=Path, default=RULES, help="the rules file")
    args = ap.parse_args(argv)
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            ap.error(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    sys.stdout.write(render(args.rules.read_text(), args.name, args.namespace, labels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
