"""Reading the operations kit (deploy/grafana/trex.json, deploy/prometheus/alerts.yml) against a
/metrics exposition: which series each query names, and the alert rules evaluated by promtool on
series built from two live scrapes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "trex.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
_NAME = re.compile(r"\btrex_[a-z0-9_]+")
_LABEL_TEMPLATE = re.compile(r"\{\{\s*\$labels\.([a-zA-Z_]+)\s*\}\}")


def promtool() -> str | None:
    """Prometheus's promtool: on PATH, or where scripts/bootstrap puts it."""
    local = ROOT / ".venv" / "bin" / "promtool"
    return shutil.which("promtool") or (str(local) if local.exists() else None)


def metric_names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def dashboard_queries() -> list[tuple[str, str]]:
    """``(panel title, expr)`` for every query of every panel."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def samples(text: str) -> dict[tuple[str, tuple], tuple[float, str]]:
    """``(sample name, sorted labels) -> (value, family type)``."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = (s.value, fam.type)
    return out


def exported_names(text: str) -> set[str]:
    return {name for name, _labels in samples(text)}


def _series(name: str, labels: tuple) -> str:
    inner = ",".join(f"{k}={json.dumps(v)}" for k, v in (*labels, ("instance", "gw"), ("job", "trex")))
    return f"{name}{{{inner}}}"


def _num(v: float) -> str:
    return f"{v:.6f}".rstrip("0").rstrip(".") or "0"


def input_series(before: str, after: str, points: int = 40) -> list[dict[str, str]]:
    """Series for ``promtool test rules`` at a 1m interval: counters grow each minute by what they
    grew between the two scrapes (the traffic seen keeps coming), other gauges hold their last value."""
    old, new = samples(before), samples(after)
    out = [{"series": 'up{instance="gw",job="trex"}', "values": f"1+0x{points}"}]
    for key, (value, typ) in new.items():
        if value != value:  # NaN
            continue
        # Gauges named *_total (rows dropped, keys suspended) are cumulative counts: they grow too.
        if typ in ("counter", "histogram", "summary") or key[0].endswith("_total"):
            start = old.get(key, (0.0, typ))[0]
            step = max(0.0, value - start)
            values = f"{_num(start)}+{_num(step)}x{points}"
        else:
            values = f"{_num(value)}+0x{points}"
        out.append({"series": _series(*key), "values": values})
    return out


def run_rule_tests(before: str, after: str, firing: dict[str, list[dict[str, str]]],
                   workdir: Path, eval_time: str = "20m") -> subprocess.CompletedProcess:
    """Evaluate every rule of alerts.yml with promtool on the series of two live scrapes. ``firing``
    names the alerts expected to fire with their labels (severity added from the rule); every other
    rule is expected not to fire. Annotations are the rule's, with ``$labels`` filled in."""
    tests = []
    for rule in alert_rules():
        expected = []
        for labels in firing.get(rule["alert"], []):
            full = {**labels, **rule.get("labels", {})}
            notes = {k: _LABEL_TEMPLATE.sub(lambda m, f=full: f.get(m.group(1), ""), v)
                     for k, v in rule.get("annotations", {}).items()}
            expected.append({"exp_labels": full, "exp_annotations": notes})
        tests.append({"eval_time": eval_time, "alertname": rule["alert"], "exp_alerts": expected})
    doc = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m",
           "tests": [{"interval": "1m", "input_series": input_series(before, after), "alert_rule_test": tests}]}
    path = workdir / "alerts_test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
