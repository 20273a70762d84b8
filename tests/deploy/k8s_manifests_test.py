#!/usr/bin/env python3
"""tests/deploy/k8s_manifests_test.py — checks deploy/k8s offline.

Renders every kustomization under deploy/k8s with `kubectl kustomize` (no
cluster needed), parses the output as YAML and asserts what the deployment
promises: native gRPC probes on grpc.health.v1 (or, where the gRPC port has
TLS, `blockmeta health` over the plaintext Unix socket), resources on every
container, a locked-down securityContext, a termination grace period longer
than preStop + the server's drain, a ConfigMap config that parses as
blockmeta.v1.ServerConfig (via config_check, the server's own parser) and
matches the ports, mounts and Secrets of the pod, metrics scraping, and
references (ConfigMaps, PVCs, Services, NetworkPolicies, ServiceMonitors)
that resolve.

Usage (Bazel passes it): k8s_manifests_test.py CONFIG_CHECK_BINARY
A missing kubectl or PyYAML is a failure, never a skip.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

import sidecar_certs

try:
    import yaml
except ImportError:  # Fail loudly: scripts/setup installs python3-yaml.
    sys.exit("k8s_manifests_test: PyYAML missing (apt-get install python3-yaml)")

# blockmetad's default --shutdown_grace_seconds / shutdown_grace_seconds.
SERVER_DEFAULT_GRACE_SECONDS = 20
# kustomize features used here (components, labels) need kustomize >= 4.
MIN_KUSTOMIZE_MAJOR = 4

# Every kustomization the repository ships, and what each must contain.
EXPECTED = {
    "base": {"kinds": {"Deployment", "ConfigMap"}},
    "overlays/sidecar": {
        "kinds": {"Deployment", "ConfigMap", "PersistentVolumeClaim",
                  "NetworkPolicy"},
        "shared_nbd_socket": True,
    },
    "overlays/standalone": {
        "kinds": {"Deployment", "ConfigMap", "Service"},
        "tls": True,
    },
    "overlays/csi-snapshot-metadata": {
        "kinds": {"Deployment", "ConfigMap", "Service", "NetworkPolicy",
                  "Secret", "ServiceAccount", "ClusterRole",
                  "ClusterRoleBinding", "SnapshotMetadataService"},
        "csi_sidecar": True,
    },
    "overlays/standalone-monitored": {
        "kinds": {"Deployment", "ConfigMap", "Service", "ServiceMonitor",
                  "PrometheusRule"},
        "tls": True,
    },
}
COMPONENTS = {"components/servicemonitor", "components/monitoring"}

CONFIG_CHECK = None  # set from argv in main()
K8S_DIR = None  # a dereferenced copy of deploy/k8s


def parse_quantity(q):
    """Kubernetes quantity ("512Mi", "100m", "2") -> float (bytes / cores)."""
    q = str(q)
    suffixes = {
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
        "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3,
    }
    for suffix, factor in sorted(suffixes.items(), key=lambda s: -len(s[0])):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    return float(q)


def port_of(hostport):
    m = re.fullmatch(r"(.*):(\d+)", hostport)
    if not m:
        raise AssertionError("not host:port: %r" % hostport)
    return m.group(1), int(m.group(2))


def render(rel):
    out = subprocess.run(
        ["kubectl", "kustomize", os.path.join(K8S_DIR, rel)],
        check=False, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError("kubectl kustomize %s failed:\n%s" %
                             (rel, out.stderr))
    docs = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    if not docs:
        raise AssertionError("kubectl kustomize %s rendered nothing" % rel)
    return docs


def parse_config(text, label):
    """Parses a ServerConfig text proto with config_check; returns a dict."""
    out = subprocess.run([CONFIG_CHECK, "-"], input=text, check=False,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError("%s is not a valid blockmeta.v1.ServerConfig:\n%s"
                             % (label, out.stderr))
    return json.loads(out.stdout)


def mount_for(container, path):
    """The volumeMount of `container` whose mountPath holds `path`."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"]):
                best = m
    return best


def volume(pod, name):
    for v in pod.get("volumes", []):
        if v["name"] == name:
            return v
    raise AssertionError("pod has no volume %r" % name)


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


class Rendered:
    """One rendered kustomization, indexed by kind."""

    def __init__(self, rel):
        self.rel = rel
        self.docs = render(rel)
        self.by_kind = {}
        for d in self.docs:
            for field in ("apiVersion", "kind", "metadata"):
                if field not in d:
                    raise AssertionError("%s: object without %s: %r" %
                                         (rel, field, d))
            if not d["metadata"].get("name"):
                raise AssertionError("%s: %s without a name" % (rel, d["kind"]))
            self.by_kind.setdefault(d["kind"], []).append(d)

    def named(self, kind, name):
        for d in self.by_kind.get(kind, []):
            if d["metadata"]["name"] == name:
                return d
        raise AssertionError("%s: no %s named %r (have %s)" % (
            self.rel, kind, name,
            [d["metadata"]["name"] for d in self.by_kind.get(kind, [])]))


def setUpModule():
    global K8S_DIR
    if shutil.which("kubectl") is None:
        raise AssertionError("kubectl not on PATH: `kubectl kustomize` renders "
                             "the manifests (scripts/setup)")
    out = subprocess.run(["kubectl", "version", "--client", "-o", "json"],
                         check=True, capture_output=True, text=True,
                         timeout=60)
    version = json.loads(out.stdout).get("kustomizeVersion", "")
    m = re.match(r"v?(\d+)\.", version)
    if not m or int(m.group(1)) < MIN_KUSTOMIZE_MAJOR:
        raise AssertionError("kubectl's kustomize %r is older than v%d "
                             "(components, labels)" %
                             (version, MIN_KUSTOMIZE_MAJOR))
    # Runfiles are symlinks; kustomize's root checks want real files.
    K8S_DIR = os.path.join(os.environ.get("TEST_TMPDIR", tempfile.mkdtemp()),
                           "k8s")
    shutil.rmtree(K8S_DIR, ignore_errors=True)
    shutil.copytree("deploy/k8s", K8S_DIR, symlinks=False)
    # The csi-snapshot-metadata overlay renders only with its TLS files.
    sidecar_certs.make(K8S_DIR)


class KustomizationSetTest(unittest.TestCase):
    def test_every_kustomization_is_known(self):
        found, components = set(), set()
        for root, _, files in os.walk(K8S_DIR):
            if "kustomization.yaml" not in files:
                continue
            rel = os.path.relpath(root, K8S_DIR)
            with open(os.path.join(root, "kustomization.yaml")) as f:
                k = yaml.safe_load(f)
            (components if k.get("kind") == "Component" else found).add(rel)
        self.assertEqual(found, set(EXPECTED))
        self.assertEqual(components, COMPONENTS)
        # Each component is rendered through at least one overlay.
        used = set()
        for rel in found:
            with open(os.path.join(K8S_DIR, rel, "kustomization.yaml")) as f:
                for c in yaml.safe_load(f).get("components", []):
                    used.add(os.path.normpath(os.path.join(rel, c)))
        self.assertEqual(used, COMPONENTS)


class ManifestTest(unittest.TestCase):
    rel = None  # set by subclasses made in load_tests

    @classmethod
    def setUpClass(cls):
        cls.r = Rendered(cls.rel)
        cls.expect = EXPECTED[cls.rel]

    def deployments(self):
        deps = self.r.by_kind.get("Deployment", [])
        self.assertTrue(deps, "no Deployment")
        return deps

    def blockmeta(self, pod):
        for c in pod["containers"]:
            if c["name"] == "blockmeta":
                return c
        self.fail("no container named blockmeta")

    def config_of(self, pod, container):
        """(config dict, effective flags) of the blockmeta container."""
        argv = container.get("command", []) + container.get("args", [])
        flags = dict(a[2:].split("=", 1) for a in argv
                     if a.startswith("--") and "=" in a)
        self.assertIn("config", flags, "blockmetad without --config")
        path = flags["config"]
        m = mount_for(container, path)
        self.assertIsNotNone(m, "--config=%s is not on a mounted volume" % path)
        vol = volume(pod, m["name"])
        self.assertIn("configMap", vol, "%s is not from a ConfigMap" % path)
        if m["mountPath"].rstrip("/") == path:
            key = m.get("subPath")
            self.assertTrue(key, "config mounted as a file without subPath")
        else:
            key = os.path.relpath(path, m["mountPath"])
        cm = self.r.named("ConfigMap", vol["configMap"]["name"])
        self.assertIn(key, cm.get("data", {}),
                      "ConfigMap %s has no key %s" % (cm["metadata"]["name"],
                                                      key))
        config = parse_config(cm["data"][key], "%s: ConfigMap %s key %s" % (
            self.rel, cm["metadata"]["name"], key))
        return config, flags

    def test_expected_kinds(self):
        self.assertLessEqual(self.expect["kinds"], set(self.r.by_kind))

    def test_selectors_match_templates(self):
        for d in self.deployments():
            labels = d["spec"]["template"]["metadata"]["labels"]
            self.assertTrue(labels_match(d["spec"]["selector"]["matchLabels"],
                                         labels))
            self.assertEqual(labels.get("app.kubernetes.io/name"), "blockmeta")

    def test_pod_security(self):
        for d in self.deployments():
            pod = d["spec"]["template"]["spec"]
            psc = pod.get("securityContext", {})
            self.assertIs(psc.get("runAsNonRoot"), True)
            self.assertNotEqual(psc.get("runAsUser", 0), 0)
            self.assertEqual(psc.get("seccompProfile", {}).get("type"),
                             "RuntimeDefault")
            self.assertIs(pod.get("hostNetwork", False), False)
            self.assertIs(pod.get("hostPID", False), False)
            for c in pod["containers"] + pod.get("initContainers", []):
                with self.subTest(container=c["name"]):
                    sc = c.get("securityContext", {})
                    self.assertIs(sc.get("allowPrivilegeEscalation"), False)
                    self.assertIs(sc.get("readOnlyRootFilesystem"), True)
                    self.assertIs(sc.get("privileged", False), False)
                    self.assertIs(sc.get("runAsNonRoot", True), True)
                    self.assertNotEqual(sc.get("runAsUser", 1), 0)
                    self.assertEqual(sc.get("capabilities", {}).get("drop"),
                                     ["ALL"])
                    self.assertFalse(sc.get("capabilities", {}).get("add"))
                    self.assertEqual(
                        sc.get("seccompProfile", psc["seccompProfile"])["type"],
                        "RuntimeDefault")

    def test_resources(self):
        for d in self.deployments():
            pod = d["spec"]["template"]["spec"]
            for c in pod["containers"] + pod.get("initContainers", []):
                with self.subTest(container=c["name"]):
                    res = c.get("resources", {})
                    for kind in ("requests", "limits"):
                        for r in ("cpu", "memory"):
                            self.assertIn(r, res.get(kind, {}),
                                          "%s.%s unset" % (kind, r))
                    for r in ("cpu", "memory"):
                        self.assertLessEqual(
                            parse_quantity(res["requests"][r]),
                            parse_quantity(res["limits"][r]))

    def test_config_and_probes(self):
        for d in self.deployments():
            pod = d["spec"]["template"]["spec"]
            c = self.blockmeta(pod)
            config, flags = self.config_of(pod, c)
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            unix = flags.get("grpc_unix_socket", config.get("grpc_unix_socket"))
            tls = config.get("tls", {})
            self.assertEqual(bool(tls.get("cert_file")),
                             self.expect.get("tls", False),
                             "TLS on the gRPC port, as the overlay promises")

            # Local clients and exec probes need the Unix socket on a
            # writable emptyDir.
            self.assertTrue(unix, "grpc_unix_socket unset")
            m = mount_for(c, unix)
            self.assertIsNotNone(m, "%s not on a volume" % unix)
            self.assertIn("emptyDir", volume(pod, m["name"]))
            self.assertFalse(m.get("readOnly", False))

            host, grpc_port = port_of(flags.get("grpc_listen",
                                                config["grpc_listen"]))
            self.assertEqual(ports.get("grpc"), grpc_port)
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe == "startupProbe" and probe not in c:
                    continue
                with self.subTest(probe=probe):
                    self.assertIn(probe, c)
                    p = c[probe]
                    if not tls.get("cert_file"):
                        # kubelet's native gRPC probe: plaintext, pod IP.
                        self.assertEqual(set(p) & {"grpc", "exec", "httpGet",
                                                   "tcpSocket"}, {"grpc"})
                        self.assertEqual(p["grpc"]["port"], grpc_port)
                        self.assertIn("service", p["grpc"])
                        self.assertEqual(p["grpc"]["service"], "")
                        self.assertIn(host, ("0.0.0.0", "[::]", ""),
                                      "kubelet probes the pod IP")
                    else:
                        # Native probes cannot speak TLS: ask over the
                        # plaintext Unix socket with the client.
                        self.assertEqual(
                            p.get("exec", {}).get("command"),
                            ["/usr/local/bin/blockmeta", "health",
                             "--server=unix:" + unix])

            # TLS files come from a mounted Secret.
            for field in ("cert_file", "key_file", "client_ca_file"):
                if tls.get(field):
                    with self.subTest(tls=field):
                        m = mount_for(c, tls[field])
                        self.assertIsNotNone(m, "%s not mounted" % tls[field])
                        self.assertIn("secret", volume(pod, m["name"]))

            # Shutdown budget: preStop + drain < terminationGracePeriodSeconds.
            grace = int(flags.get("shutdown_grace_seconds",
                                  config.get("shutdown_grace_seconds", 0))
                        or SERVER_DEFAULT_GRACE_SECONDS)
            pre_stop = 0
            hook = c.get("lifecycle", {}).get("preStop")
            if hook:
                cmd = hook.get("exec", {}).get("command", [])
                self.assertEqual(cmd[:1], ["/bin/sleep"],
                                 "preStop other than a sleep: %r" % hook)
                pre_stop = int(cmd[1])
            self.assertIn("terminationGracePeriodSeconds", pod)
            self.assertGreater(pod["terminationGracePeriodSeconds"],
                               pre_stop + grace)
            # Other containers' preStop hooks end within the grace too.
            for other in pod["containers"]:
                cmd = (other.get("lifecycle", {}).get("preStop", {})
                       .get("exec", {}).get("command", []))
                if cmd[:1] == ["/bin/sleep"]:
                    self.assertLess(int(cmd[1]),
                                    pod["terminationGracePeriodSeconds"])

            # The cache fits the memory limit with room for the rest.
            limit = parse_quantity(c["resources"]["limits"]["memory"])
            cache = int(config.get("cache", {}).get("memory_limit_bytes", 0)
                        or 256 * 2**20)
            self.assertLess(cache, limit * 0.75)

            # Metrics: the port exists and something scrapes it.
            _, metrics_port = port_of(config["metrics_listen"])
            self.assertEqual(ports.get("metrics"), metrics_port)
            ann = d["spec"]["template"]["metadata"].get("annotations", {})
            if ann.get("prometheus.io/scrape") == "true":
                self.assertEqual(ann.get("prometheus.io/port"),
                                 str(metrics_port))
                self.assertEqual(ann.get("prometheus.io/path"), "/metrics")
            else:
                self.assertIn("ServiceMonitor", self.r.by_kind,
                              "metrics neither annotated nor monitored")

            # Sidecar: the exporter's socket is in an emptyDir that both
            # the exporter and blockmeta mount.
            unix_exports = [e for e in config.get("exports", [])
                            if e.get("nbd_uri", "").startswith("nbd+unix:")]
            if self.expect.get("shared_nbd_socket"):
                self.assertTrue(unix_exports, "no nbd+unix export")
            for e in unix_exports:
                with self.subTest(export=e["name"]):
                    sock = re.search(r"[?&]socket=([^&]+)", e["nbd_uri"])
                    self.assertIsNotNone(sock, e["nbd_uri"])
                    sock = sock.group(1)
                    m = mount_for(c, sock)
                    self.assertIsNotNone(m, "%s not mounted" % sock)
                    self.assertIn("emptyDir", volume(pod, m["name"]))
                    sharers = [o["name"] for o in pod["containers"]
                               if o is not c and any(
                                   om["name"] == m["name"]
                                   for om in o.get("volumeMounts", []))]
                    self.assertTrue(sharers, "no exporter shares %s" % sock)

    def test_csi_snapshot_metadata_sidecar(self):
        """The sidecar and blockmeta share the CSI socket; the Service, the
        SnapshotMetadataService, the TLS files and the RBAC fit together."""
        if not self.expect.get("csi_sidecar"):
            return
        import base64
        d = self.deployments()[0]
        pod = d["spec"]["template"]["spec"]
        c = self.blockmeta(pod)
        config, _ = self.config_of(pod, c)
        csi = config.get("csi", {})
        socket = re.sub(r"^unix:(//)?", "", csi.get("socket", ""))
        self.assertTrue(socket.startswith("/"), "csi.socket unset")
        side = [o for o in pod["containers"] if o is not c]
        self.assertEqual(len(side), 1)
        side = side[0]
        args = dict(a[2:].split("=", 1) for a in side.get("args", [])
                    if a.startswith("--") and "=" in a)
        self.assertEqual(args.get("csi-address"), socket)
        # One emptyDir holds the socket for both containers.
        m1, m2 = mount_for(c, socket), mount_for(side, socket)
        self.assertIsNotNone(m1)
        self.assertIsNotNone(m2)
        self.assertEqual(m1["name"], m2["name"])
        self.assertIn("emptyDir", volume(pod, m1["name"]))
        self.assertFalse(m1.get("readOnly", False))
        # The sidecar's TLS port behind the Service the resource names.
        ports = {p["name"]: p["containerPort"] for p in side["ports"]}
        port = int(args["port"])
        self.assertIn(port, ports.values())
        sms = self.r.by_kind["SnapshotMetadataService"]
        self.assertEqual(len(sms), 1)
        sms = sms[0]
        self.assertEqual(sms["apiVersion"], "cbt.storage.k8s.io/v1beta1")
        self.assertEqual(sms["metadata"]["name"], csi.get("driver_name"),
                         "the resource is named after the CSI driver")
        host, svc_port = port_of(sms["spec"]["address"])
        svc_name, ns = host.split(".")[:2]
        self.assertEqual(ns, d["metadata"]["namespace"])
        svc = self.r.named("Service", svc_name)
        sp = [p for p in svc["spec"]["ports"] if p["port"] == svc_port]
        self.assertEqual(len(sp), 1, "no Service port %d" % svc_port)
        self.assertEqual(ports[sp[0]["targetPort"]], port)
        self.assertEqual(sms["spec"]["audience"], args.get("audience"))
        # The CA in the resource signed the certificate the sidecar serves,
        # for the name in the address.
        tls_mount = mount_for(side, args["tls-cert"])
        self.assertIsNotNone(tls_mount)
        secret = self.r.named(
            "Secret", volume(pod, tls_mount["name"])["secret"]["secretName"])
        key = os.path.relpath(args["tls-cert"], tls_mount["mountPath"])
        tmp = os.environ.get("TEST_TMPDIR", tempfile.mkdtemp())
        ca, crt = os.path.join(tmp, "sms-ca.pem"), os.path.join(tmp, "srv.pem")
        with open(ca, "wb") as f:
            f.write(base64.b64decode(sms["spec"]["caCert"]))
        with open(crt, "wb") as f:
            f.write(base64.b64decode(secret["data"][key]))
        out = subprocess.run(["openssl", "verify", "-CAfile", ca,
                              "-verify_hostname", host, crt],
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        # The sidecar authenticates and authorizes clients with its token.
        self.assertIs(pod.get("automountServiceAccountToken"), True)
        sa = pod.get("serviceAccountName")
        self.r.named("ServiceAccount", sa)
        granted = set()
        for b in self.r.by_kind.get("ClusterRoleBinding", []):
            if not any(s["kind"] == "ServiceAccount" and s["name"] == sa and
                       s.get("namespace") == ns for s in b["subjects"]):
                continue
            role = self.r.named("ClusterRole", b["roleRef"]["name"])
            for rule in role["rules"]:
                for res in rule["resources"]:
                    for verb in rule["verbs"]:
                        granted.add((res, verb))
        for need in (("tokenreviews", "create"),
                     ("subjectaccessreviews", "create"),
                     ("volumesnapshots", "get"),
                     ("volumesnapshotcontents", "get"),
                     ("snapshotmetadataservices", "get")):
            self.assertIn(need, granted)
        # Clients reach the pod through the sidecar only (and metrics).
        for np in self.r.by_kind.get("NetworkPolicy", []):
            allowed = {p["port"] for rule in np["spec"].get("ingress", [])
                       for p in rule.get("ports", [])}
            self.assertIn(port, allowed)
            self.assertNotIn(50051, allowed)

    def test_references_resolve(self):
        for d in self.deployments():
            pod = d["spec"]["template"]["spec"]
            names = {v["name"] for v in pod.get("volumes", [])}
            for c in pod["containers"] + pod.get("initContainers", []):
                for m in c.get("volumeMounts", []):
                    self.assertIn(m["name"], names)
            for v in pod.get("volumes", []):
                if "configMap" in v:
                    self.r.named("ConfigMap", v["configMap"]["name"])
                if "persistentVolumeClaim" in v:
                    self.r.named("PersistentVolumeClaim",
                                 v["persistentVolumeClaim"]["claimName"])

    def test_services_reach_pods(self):
        pods = [d["spec"]["template"] for d in self.deployments()]
        for svc in self.r.by_kind.get("Service", []):
            with self.subTest(service=svc["metadata"]["name"]):
                sel = svc["spec"]["selector"]
                targets = [p for p in pods
                           if labels_match(sel, p["metadata"]["labels"])]
                self.assertTrue(targets, "selector %r matches no pod" % sel)
                names = {p["name"] for t in targets
                         for c in t["spec"]["containers"]
                         for p in c.get("ports", [])}
                for port in svc["spec"]["ports"]:
                    self.assertIn(port["targetPort"], names)

    def test_network_policies_select_pods(self):
        pods = [d["spec"]["template"] for d in self.deployments()]
        for np in self.r.by_kind.get("NetworkPolicy", []):
            sel = np["spec"]["podSelector"]["matchLabels"]
            self.assertTrue(any(labels_match(sel, p["metadata"]["labels"])
                                for p in pods))
            # Metrics stay reachable.
            allowed = {p["port"] for rule in np["spec"].get("ingress", [])
                       for p in rule.get("ports", [])}
            self.assertIn(9090, allowed)

    def test_service_monitors_select_services(self):
        for sm in self.r.by_kind.get("ServiceMonitor", []):
            sel = sm["spec"]["selector"]["matchLabels"]
            svcs = [s for s in self.r.by_kind.get("Service", [])
                    if labels_match(sel, s["metadata"].get("labels", {}))]
            self.assertTrue(svcs, "ServiceMonitor selects no Service")
            port_names = {p["name"] for s in svcs for p in s["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                self.assertIn(ep["port"], port_names)


def load_tests(loader, standard_tests, pattern):
    suite = unittest.TestSuite()
    suite.addTests(loader.loadTestsFromTestCase(KustomizationSetTest))
    for rel in sorted(EXPECTED):
        name = "Manifest_" + re.sub(r"\W", "_", rel)
        cls = type(name, (ManifestTest,), {"rel": rel})
        suite.addTests(loader.loadTestsFromTestCase(cls))
    return suite


def main():
    global CONFIG_CHECK
    if len(sys.argv) < 2:
        sys.exit("usage: k8s_manifests_test.py CONFIG_CHECK_BINARY")
    CONFIG_CHECK = os.path.abspath(sys.argv[1])
    unittest.main(argv=sys.argv[:1], verbosity=2)


if __name__ == "__main__":
    main()
