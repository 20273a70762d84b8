#!/usr/bin/env python3
"""tests/deploy/probes_test.py — runs the shipped configs and probes for real.

For each deployment config (the rendered ConfigMaps of the k8s overlays, the
container image's default config, the systemd example), starts the real
blockmetad on it with only paths and addresses moved into $TEST_TMPDIR
(/run/blockmeta, /run/nbd, /etc/blockmeta/tls, /var/lib/blockmeta; TCP on
127.0.0.1 port 0; remote NBD servers replaced by a local nbdkit), then:
  * runs every probe of the manifest as the kubelet would: a native gRPC
    probe is a plaintext grpc.health.v1 Check of "" on the gRPC port, an
    exec probe is its command (with the client from runfiles); the
    container's HEALTHCHECK command likewise;
  * waits until every export reports SERVING (the config's upstream wiring
    works);
  * sends SIGTERM and requires exit status 0 within shutdown_grace_seconds.
TLS configs get a fresh CA, server and client certificate from openssl.

Usage (Bazel passes it): probes_test.py BLOCKMETAD BLOCKMETA
A missing kubectl, openssl, nbdkit or qemu-img is a failure, never a skip.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

import sidecar_certs

try:
    import yaml
except ImportError:
    sys.exit("probes_test: PyYAML missing (apt-get install python3-yaml)")

BLOCKMETAD = BLOCKMETA = None
TMP = None
DEADLINE_S = 20  # start-up and readiness waits


def wait_for(predicate, what, timeout=DEADLINE_S):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for %s" % what)


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def make_certs(d):
    os.makedirs(d, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

    def ok(cmd):
        r = run(cmd, cwd=d)
        if r.returncode != 0:
            raise AssertionError("%s: %s" % (" ".join(cmd), r.stderr))

    ok(["openssl", "req", "-x509"] + ec + ["-days", "2", "-subj",
       "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.crt"])
    for name, ext in (("tls", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                       "extendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        with open(os.path.join(d, name + ".ext"), "w") as f:
            f.write(ext)
        ok(["openssl", "req"] + ec + ["-subj", "/CN=" + name, "-keyout",
           name + ".key", "-out", name + ".csr"])
        ok(["openssl", "x509", "-req", "-in", name + ".csr", "-CA", "ca.crt",
            "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile",
            name + ".ext", "-out", name + ".crt"])


def render(rel):
    r = run(["kubectl", "kustomize", os.path.join(TMP, "k8s", rel)])
    if r.returncode != 0:
        raise AssertionError("kubectl kustomize %s: %s" % (rel, r.stderr))
    return [d for d in yaml.safe_load_all(r.stdout) if d]


class Server:
    """blockmetad on a relocated config, plus the local nbdkit upstream."""

    def __init__(self, name, text):
        self.dir = os.path.join(TMP, name)
        shutil.rmtree(self.dir, ignore_errors=True)
        for sub in ("run", "nbd", "state", "csi"):
            os.makedirs(os.path.join(self.dir, sub))
        self.moves = {
            "/run/blockmeta": os.path.join(self.dir, "run"),
            "/run/nbd": os.path.join(self.dir, "nbd"),
            "/etc/blockmeta/tls": os.path.join(TMP, "tls"),
            "/var/lib/blockmeta": os.path.join(self.dir, "state"),
            "/csi/": os.path.join(self.dir, "csi") + "/",
        }
        sock = os.path.join(self.dir, "nbd", "disk.sock")
        text = re.sub(r'nbd://[^"]*', "nbd+unix:///disk?socket=" + sock, text)
        # The systemd example's image upstream.
        if "/var/lib/blockmeta/vm1.qcow2" in text:
            r = run(["qemu-img", "create", "-f", "qcow2",
                     os.path.join(self.dir, "state", "vm1.qcow2"), "64M"])
            assert r.returncode == 0, r.stderr
        self.text = self.move(text)
        self.config = os.path.join(self.dir, "config.textproto")
        with open(self.config, "w") as f:
            f.write(self.text)
        self.nbdkit = subprocess.Popen(
            ["nbdkit", "--foreground", "--unix", sock, "memory", "64M"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(sock), "nbdkit socket")
        self.port_file = os.path.join(self.dir, "port")
        self.log = open(os.path.join(self.dir, "blockmetad.log"), "w")
        self.proc = subprocess.Popen(
            [BLOCKMETAD, "--config=" + self.config,
             "--grpc_listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
             "--port_file=" + self.port_file, "--log_format=text"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self.started, "blockmetad port file")
        with open(self.port_file) as f:  # "grpc=N nbd=N metrics=N"
            ports = dict(kv.split("=") for kv in f.read().split())
        self.port = int(ports["grpc"])
        self.metrics_port = int(ports["metrics"])

    def started(self):
        if self.proc.poll() is not None:
            raise AssertionError("blockmetad exited %d:\n%s" %
                                 (self.proc.returncode, self.logtext()))
        return os.path.exists(self.port_file) and \
            os.path.getsize(self.port_file) > 0

    def logtext(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-4000:]

    def move(self, s):
        for old, new in self.moves.items():
            s = s.replace(old, new)
        return s

    def client(self, *args, tls=False):
        cmd = [BLOCKMETA, "--server=127.0.0.1:%d" % self.port, "--timeout=5s"]
        if tls:
            t = os.path.join(TMP, "tls")
            cmd += ["--tls-ca=%s/ca.crt" % t, "--tls-cert=%s/client.crt" % t,
                    "--tls-key=%s/client.key" % t]
        return run(cmd + list(args))

    def stop(self):
        """SIGTERM; returns (exit status, seconds taken)."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=40)
        finally:
            self.close()
        return code, time.monotonic() - start

    def close(self):
        for p in (self.proc, self.nbdkit):
            if p.poll() is None:
                p.kill()
                p.wait()
        self.log.close()


class ProbesTest(unittest.TestCase):
    def check(self, name, config_text, probes, grace):
        srv = Server(name, config_text)
        try:
            tls = re.search(r"(?m)^tls\s*{", config_text) is not None
            for label, probe in probes:
                with self.subTest(probe=label):
                    if "grpc" in probe:
                        # What the kubelet does: plaintext Check("") on the port.
                        self.assertEqual(probe["grpc"].get("service", ""), "")
                        r = srv.client("health")
                    else:
                        cmd = [BLOCKMETA if c == "/usr/local/bin/blockmeta"
                               else srv.move(c) for c in probe["exec"]["command"]]
                        r = run(cmd)
                    self.assertEqual(r.returncode, 0, "%s: %s%s\nserver log:\n%s"
                                     % (label, r.stdout, r.stderr, srv.logtext()))
            # Every export of the config becomes ready.
            listing = srv.client("list", "--output=json", tls=tls)
            self.assertEqual(listing.returncode, 0, listing.stderr)
            names = re.findall(r'(?m)^\s*name: "([^"]+)"', config_text)
            for export in names:
                svc = "blockmeta.v1.BlockMeta/" + export
                wait_for(lambda: srv.client("health", svc, tls=tls).returncode
                         == 0, "export %s SERVING" % export)
            # The scrape target the annotations and ServiceMonitor name.
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" %
                                        srv.metrics_port, timeout=5) as resp:
                self.assertEqual(resp.status, 200)
                self.assertIn("# TYPE", resp.read().decode())
            # The CSI driver socket the sidecar's --csi-address names.
            csi = re.search(r'socket: "unix://(/[^"]+)"', srv.text)
            if csi:
                r = run([BLOCKMETA, "--server=unix:" + csi.group(1),
                         "--timeout=5s", "health"])
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            code, took = srv.stop()
            self.assertEqual(code, 0, srv.logtext())
            self.assertLess(took, grace + 2)
            print("%s: %d export(s) ready; SIGTERM -> exit 0 in %.2f s" %
                  (name, len(names), took))
        finally:
            srv.close()

    def k8s(self, rel):
        docs = render(rel)
        dep = [d for d in docs if d["kind"] == "Deployment"][0]
        pod = dep["spec"]["template"]["spec"]
        c = [c for c in pod["containers"] if c["name"] == "blockmeta"][0]
        vol = [v for v in pod["volumes"] if v["name"] == "config"][0]
        cm = [d for d in docs if d["kind"] == "ConfigMap" and
              d["metadata"]["name"] == vol["configMap"]["name"]][0]
        text = cm["data"]["config.textproto"]
        grace = int((re.search(r"shutdown_grace_seconds: (\d+)", text) or
                     re.search("(20)", "20")).group(1))
        probes = [(p, c[p]) for p in ("startupProbe", "livenessProbe",
                                      "readinessProbe") if p in c]
        self.check(rel.replace("/", "_"), text, probes, grace)

    def test_k8s_base(self):
        self.k8s("base")

    def test_k8s_sidecar(self):
        self.k8s("overlays/sidecar")

    def test_k8s_standalone(self):
        self.k8s("overlays/standalone")

    def test_k8s_csi_snapshot_metadata(self):
        self.k8s("overlays/csi-snapshot-metadata")

    def test_container_default_config(self):
        with open("deploy/container/Containerfile") as f:
            m = re.search(r"HEALTHCHECK .*?CMD\s+(\[.*?\])", f.read(), re.S)
        with open("deploy/container/config.textproto") as f:
            text = f.read()
        grace = int(re.search(r"shutdown_grace_seconds: (\d+)", text).group(1))
        self.check("container", text,
                   [("HEALTHCHECK", {"exec": {"command": json.loads(m.group(1))}})],
                   grace)

    def test_systemd_example_config(self):
        with open("deploy/systemd/config.textproto") as f:
            text = f.read()
        self.check("systemd", text, [], 20)


def main():
    global BLOCKMETAD, BLOCKMETA, TMP
    if len(sys.argv) != 3:
        sys.exit("usage: probes_test.py BLOCKMETAD BLOCKMETA")
    BLOCKMETAD, BLOCKMETA = map(os.path.abspath, sys.argv[1:])
    for tool in ("kubectl", "openssl", "nbdkit", "qemu-img"):
        if shutil.which(tool) is None:
            sys.exit("probes_test: %s not on PATH (scripts/setup)" % tool)
    # Unix socket paths must stay under 108 bytes: use a short directory.
    TMP = tempfile.mkdtemp(prefix="bmp", dir="/tmp")
    try:
        shutil.copytree("deploy/k8s", os.path.join(TMP, "k8s"))
        sidecar_certs.make(os.path.join(TMP, "k8s"))
        make_certs(os.path.join(TMP, "tls"))
        result = unittest.main(argv=sys.argv[:1], verbosity=2, exit=False)
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(0 if result.result.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
