"""Render and lint the Helm chart with the Helm v4 Go SDK (helm-python-sdk), then write the
rendered manifests for schema validation.

    python3 deploy/checks/render_chart.py OUT.yaml   # then: kubernetes-validate --strict OUT.yaml

Needs `pip install helm-python-sdk kubernetes-validate`.
"""
import sys
from pathlib import Path

import helm_python

chart_dir = Path(__file__).resolve().parents[1] / "protodino"
values = {"auth": {"jobToken": "render-check-token"}}

report = helm_python.lint(str(chart_dir), values, strict=True)
print("lint:", report)
# Helm severities: 1 info, 2 warning, 3 error. Warnings and errors fail the check.
messages = [m for m in report.get("messages", []) if int(m.get("severity", 3)) >= 2] + list(report.get("errors", []))
chart = helm_python.Chart.load(str(chart_dir))
rendered = chart.render(values, name="pd", namespace="ml", is_install=True)
docs = [text for path, text in sorted(rendered.items()) if path.endswith(".yaml") and text.strip()]
Path(sys.argv[1]).write_text("\n---\n".join(docs))
print(f"rendered {len(docs)} manifests")
if messages:
    sys.exit(f"lint problems: {messages}")
