#!/usr/bin/env python3
"""tests/deploy/monitoring_test.py — the shipped alerts and dashboard
(deploy/k8s/components/monitoring, rendered through the
standalone-monitored overlay) checked by real tools:

  * the PrometheusRule's rule groups, extracted into a plain rules file,
    pass `promtool check rules`, and `promtool test rules` shows the main
    alerts fire on the series that should fire them (and a broken rule
    fails the check, so the check can fail);
  * every metric name the rules and the dashboard's queries use is really
    exported: a real blockmetad (nbdkit upstream, NBD shim, one query made
    through the CLI so that per-call families exist) is scraped on
    /metrics and each name must be among its samples.

Usage (Bazel passes it): monitoring_test.py BLOCKMETAD BLOCKMETA
A missing promtool, kubectl or nbdkit is a failure, never a skip.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

try:
    import yaml
except ImportError:
    sys.exit("monitoring_test: PyYAML missing (apt-get install python3-yaml)")

BLOCKMETAD = BLOCKMETA = None
TMP = None
OVERLAY = "overlays/standalone-monitored"
# Metric families blockmetad exports; anything else in an expression with
# these prefixes must exist too (a typo is caught, not silently empty).
PREFIXES = ("blockmeta_", "grpc_server_")


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          **kw)


def require(tool):
    if shutil.which(tool) is None:
        raise AssertionError("%s missing: run scripts/setup" % tool)


def rendered():
    """The standalone-monitored overlay's documents."""
    k8s = os.path.join(TMP, "k8s")
    if not os.path.isdir(k8s):
        # Runfiles are symlinks; kustomize's root checks want real files.
        shutil.copytree("deploy/k8s", k8s, symlinks=False)
    r = run(["kubectl", "kustomize", os.path.join(k8s, OVERLAY)])
    if r.returncode != 0:
        raise AssertionError("kubectl kustomize %s: %s" % (OVERLAY, r.stderr))
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def rule_groups(docs):
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    if len(rules) != 1:
        raise AssertionError("want one PrometheusRule, got %d" % len(rules))
    return rules[0]["spec"]["groups"]


def dashboard(docs):
    cms = [d for d in docs if d["kind"] == "ConfigMap" and
           d["metadata"]["name"] == "blockmeta-dashboard"]
    if len(cms) != 1:
        raise AssertionError("no blockmeta-dashboard ConfigMap")
    return json.loads(cms[0]["data"]["blockmeta-dashboard.json"])


def dashboard_queries(dash):
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append(t["expr"])
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]
            out.append(q if isinstance(q, str) else q.get("query", ""))
    return out


def metric_names(exprs):
    names = set()
    for e in exprs:
        for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
            if m.group(0).startswith(PREFIXES):
                names.add(m.group(0))
    return names


def write_rules(groups, path):
    with open(path, "w") as f:
        yaml.safe_dump({"groups": groups}, f, sort_keys=False)


class RulesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require("promtool")
        require("kubectl")
        cls.groups = rule_groups(rendered())
        cls.rules = os.path.join(TMP, "rules.yaml")
        write_rules(cls.groups, cls.rules)

    def test_promtool_check_rules(self):
        r = run(["promtool", "check", "rules", self.rules])
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("SUCCESS", r.stdout + r.stderr)
        alerts = [x["alert"] for g in self.groups for x in g["rules"]]
        self.assertGreaterEqual(len(alerts), 7, alerts)

    def test_a_broken_rule_fails_the_check(self):
        groups = json.loads(json.dumps(self.groups))
        groups[0]["rules"][0]["expr"] = "blockmeta_export_ready ==="
        bad = os.path.join(TMP, "bad_rules.yaml")
        write_rules(groups, bad)
        r = run(["promtool", "check", "rules", bad])
        self.assertNotEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_alerts_fire_on_their_series(self):
        """promtool test rules: each alert fires when it should, not before."""
        labels = 'namespace="ns",pod="p"'
        tests = {
            "rule_files": [self.rules],
            "evaluation_interval": "1m",
            "tests": [{
                "interval": "1m",
                "input_series": [
                    {"series": 'blockmeta_export_ready{%s,export="down"}' % labels,
                     "values": "0x20"},
                    {"series": 'blockmeta_export_ready{%s,export="up"}' % labels,
                     "values": "1x20"},
                    {"series": "blockmeta_nbd_connections{%s}" % labels,
                     "values": "4x20"},
                    {"series": "blockmeta_nbd_max_connections{%s}" % labels,
                     "values": "4x20"},
                    {"series": 'blockmeta_upstream_commands_total{%s,export="e"}'
                               % labels, "values": "0+100x30"},
                    {"series": 'blockmeta_upstream_commands_failed_total{%s,export="e"}'
                               % labels, "values": "0+10x30"},
                    {"series": 'grpc_server_handled_total{%s,grpc_code="ResourceExhausted",'
                               'grpc_method="GetExtents",grpc_service="blockmeta.v1.BlockMeta",'
                               'grpc_type="unary"}' % labels,
                     "values": "0+5x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "BlockmetaExportNotReady",
                     "exp_alerts": []},
                    {"eval_time": "10m", "alertname": "BlockmetaExportNotReady",
                     "exp_alerts": [{
                         "exp_labels": {"severity": "critical", "namespace": "ns",
                                        "pod": "p", "export": "down"},
                         "exp_annotations": {
                             "summary": "blockmeta export down is not ready",
                             "description": "Export down on p has had no "
                             "upstream connection for 5 minutes; `blockmeta "
                             "info down` shows the last error."}}]},
                    {"eval_time": "10m", "alertname": "BlockmetaNbdAtConnectionCap",
                     "exp_alerts": [{
                         "exp_labels": {"severity": "warning", "namespace": "ns",
                                        "pod": "p"},
                         "exp_annotations": {
                             "summary": "blockmeta NBD shim is at "
                             "nbd.max_connections",
                             "description": "p has held all 4 NBD connection "
                             "slots for 5 minutes; raise nbd.max_connections "
                             "or find the clients that keep sessions open."}}]},
                    {"eval_time": "20m", "alertname": "BlockmetaUpstreamErrors",
                     "exp_alerts": [{
                         "exp_labels": {"severity": "warning", "namespace": "ns",
                                        "pod": "p", "export": "e"},
                         "exp_annotations": {
                             "summary": "blockmeta upstream of e fails 10% of "
                             "its commands",
                             "description": "NBD commands to the upstream of e "
                             "fail; the server log has \"upstream\" lines with "
                             "the errors."}}]},
                    {"eval_time": "20m", "alertname": "BlockmetaAdmissionRefusals",
                     "exp_alerts": [{
                         "exp_labels": {"severity": "warning", "namespace": "ns",
                                        "pod": "p"},
                         "exp_annotations": {
                             "summary": "blockmeta refuses calls at its "
                             "in-flight cap",
                             "description": "p answers RESOURCE_EXHAUSTED at "
                             "0.08 calls/s: raise grpc.max_inflight_calls"
                             "(_per_export) or add replicas."}}]},
                    # No cache series at all: the hit-ratio alert stays silent.
                    {"eval_time": "20m", "alertname": "BlockmetaCacheHitRatioLow",
                     "exp_alerts": []},
                ],
            }],
        }
        path = os.path.join(TMP, "rules_test.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(tests, f, sort_keys=False)
        r = run(["promtool", "test", "rules", path])
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


class ExportedNamesTest(unittest.TestCase):
    """Every name the rules and the dashboard use is on a real /metrics."""

    def scrape(self):
        require("nbdkit")
        # Unix socket paths must fit sun_path (108 bytes): not under
        # Bazel's long TEST_TMPDIR.
        d = tempfile.mkdtemp(prefix="bm-mon-", dir="/tmp")
        self.addCleanup(shutil.rmtree, d, True)
        up_sock = os.path.join(d, "up.sock")
        nbdkit = subprocess.Popen(
            ["nbdkit", "--foreground", "--unix", up_sock, "data",
             "data=1 @1048576 1", "size=4M"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (nbdkit.kill(), nbdkit.wait()))
        deadline = time.monotonic() + 20
        while not os.path.exists(up_sock):
            self.assertLess(time.monotonic(), deadline, "nbdkit socket")
            time.sleep(0.05)
        config = os.path.join(d, "config.textproto")
        with open(config, "w") as f:
            f.write('grpc_listen: "127.0.0.1:0"\n'
                    'metrics_listen: "127.0.0.1:0"\n'
                    'nbd_unix_socket: "%s"\n'
                    'exports { name: "disk" nbd_uri: "nbd+unix:///?socket=%s" }\n'
                    % (os.path.join(d, "nbd.sock"), up_sock))
        port_file = os.path.join(d, "ports")
        log = open(os.path.join(d, "blockmetad.log"), "w")
        proc = subprocess.Popen(
            [BLOCKMETAD, "--config=" + config, "--port_file=" + port_file,
             "--log_format=text"], stdout=log, stderr=subprocess.STDOUT)

        def stop():
            proc.kill()
            proc.wait()
            log.close()
        self.addCleanup(stop)
        while not (os.path.exists(port_file) and os.path.getsize(port_file)):
            self.assertIsNone(proc.poll(), "blockmetad exited")
            self.assertLess(time.monotonic(), deadline, "port file")
            time.sleep(0.05)
        with open(port_file) as f:
            ports = dict(kv.split("=") for kv in f.read().split())
        cli = [BLOCKMETA, "--server=127.0.0.1:%s" % ports["grpc"],
               "--timeout=5s"]
        while run(cli + ["health", "blockmeta.v1.BlockMeta/disk"]).returncode:
            self.assertLess(time.monotonic(), deadline, "export ready")
            time.sleep(0.05)
        # One query: the per-call families (cache, upstream calls, gRPC
        # handled / latency) get their first samples.
        for _ in range(2):  # a miss, then a hit
            r = run(cli + ["map", "disk"])
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        with urllib.request.urlopen("http://127.0.0.1:%s/metrics" %
                                    ports["metrics"], timeout=5) as resp:
            return resp.read().decode()

    def test_every_used_metric_is_exported(self):
        require("kubectl")
        docs = rendered()
        exprs = [r["expr"] for g in rule_groups(docs) for r in g["rules"]]
        used_rules = metric_names(exprs)
        used_dash = metric_names(dashboard_queries(dashboard(docs)))
        self.assertGreaterEqual(len(used_rules), 8, used_rules)
        self.assertGreaterEqual(len(used_dash), 15, used_dash)
        text = self.scrape()
        exported = set()
        for line in text.splitlines():
            if line and not line.startswith("#"):
                exported.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
        self.assertIn("blockmeta_export_ready", exported)
        for name in sorted(used_rules | used_dash):
            with self.subTest(metric=name):
                self.assertIn(name, exported,
                              "%s is used by the %s but blockmetad does not "
                              "export it" % (name, "rules" if name in
                                             used_rules else "dashboard"))
        # A misspelt name would be caught: the check can fail.
        self.assertNotIn("blockmeta_export_readyy", exported)
        print("%d metric names used by rules and dashboard, all exported" %
              len(used_rules | used_dash))


def main():
    global BLOCKMETAD, BLOCKMETA, TMP
    if len(sys.argv) != 3:
        sys.exit("usage: monitoring_test.py BLOCKMETAD BLOCKMETA")
    BLOCKMETAD, BLOCKMETA = (os.path.abspath(a) for a in sys.argv[1:3])
    TMP = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
    unittest.main(argv=[sys.argv[0], "-v"])


if __name__ == "__main__":
    main()
