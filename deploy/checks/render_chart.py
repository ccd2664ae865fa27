"""Lint and render the protodino Helm chart with Helm's own Go SDK (the helm-python-sdk bindings),
as `helm lint --strict` and `helm template` would, and write the result for the other checks.

    python3 deploy/checks/render_chart.py --out-dir DIR [-f|--values FILE]... [--kube-version 1.34.0]

Values files are merged in order over the chart's values.yaml (maps merge, later files win), as
`helm -f A -f B` does. The run fails (exit status 1, the reason on stderr) when the lint reports a
warning or an error, when the values break values.schema.json, or when a template fails. On
success DIR holds:

    manifests.yaml   the Kubernetes API objects (for kubernetes-validate --strict)
    monitors.yaml    the monitoring.coreos.com objects (ServiceMonitor, PodMonitor), maybe empty
    manifests.json   every rendered object, as a JSON list (for assertions)
    NOTES.txt        the rendered install notes

Needs the validators environment that `cargo xtask validators` provisions.
"""
import argparse
import json
import sys
from pathlib import Path

import helm_python
import yaml

CHART_DIR = Path(__file__).resolve().parents[1] / "protodino"
RELEASE = "pd"
NAMESPACE = "ml"


def merge(base, override):
    """Helm's coalescing of two values maps: nested maps merge, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("-f", "--values", action="append", default=[], type=Path, help="a values file")
    parser.add_argument("--kube-version", default="1.34.0", help="Kubernetes version to lint for")
    args = parser.parse_args()

    values = {}
    for path in args.values:
        loaded = helm_python.values_from_yaml(path.read_text())
        values = merge(values, loaded or {})

    report = helm_python.lint(
        str(CHART_DIR), values, strict=True, namespace=NAMESPACE, kube_version=f"v{args.kube_version}"
    )
    # Helm severities: 1 info, 2 warning, 3 error. With --strict, warnings fail as errors do.
    problems = [m for m in report.get("messages", []) if int(m.get("severity", 3)) >= 2]
    for m in report.get("messages", []):
        print(f"lint: severity {m.get('severity')} {m.get('path')}: {m.get('error')}".rstrip())
    if problems or report.get("errors"):
        details = "\n".join(f"{m.get('path')}: {m.get('error')}".rstrip() for m in problems)
        sys.exit(f"helm lint --strict failed:\n{details}\n{report.get('errors')}")

    chart = helm_python.Chart.load(str(CHART_DIR))
    try:
        # What `helm install` checks before it renders.
        chart.validate_schema(values)
    except helm_python.HelmValuesError as e:
        sys.exit(f"values don't meet values.schema.json: {e}")
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    core, monitors, objects = [], [], []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            (args.out_dir / "NOTES.txt").write_text(text)
            continue
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            objects.append(doc)
            dumped = yaml.safe_dump(doc, sort_keys=False)
            if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
                monitors.append(dumped)
            else:
                core.append(dumped)
    (args.out_dir / "manifests.yaml").write_text("---\n".join(core))
    (args.out_dir / "monitors.yaml").write_text("---\n".join(monitors))
    (args.out_dir / "manifests.json").write_text(json.dumps(objects, indent=1))
    kinds = {}
    for doc in objects:
        kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
    print("rendered:", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))


if __name__ == "__main__":
    main()
