"""tests/deploy/sidecar_certs.py — test TLS files for the
csi-snapshot-metadata overlay.

The overlay ships no private key: an operator puts the sidecar's tls.crt,
tls.key and ca.crt in its certs/ directory (docs/deploy.md). The tests do
the same in their copy of deploy/k8s, with a throwaway CA, so the overlay
renders and the CA in the SnapshotMetadataService can be checked against
the certificate the sidecar serves. openssl is required (scripts/setup).
"""

import os
import subprocess

OVERLAY = "overlays/csi-snapshot-metadata"
# The Service's in-cluster names (the overlay's namespace is blockmeta).
SERVER_NAMES = ("csi-snapshot-metadata.blockmeta",
                "csi-snapshot-metadata.blockmeta.svc")


def make(k8s_dir):
    """Writes certs/{ca.crt,tls.crt,tls.key} into the overlay of k8s_dir."""
    d = os.path.join(k8s_dir, OVERLAY, "certs")
    os.makedirs(d, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

    def ok(cmd):
        r = subprocess.run(cmd, cwd=d, capture_output=True, text=True,
                           timeout=60, check=False)
        if r.returncode != 0:
            raise AssertionError("%s: %s" % (" ".join(cmd), r.stderr))

    ok(["openssl", "req", "-x509"] + ec + ["-days", "2", "-subj",
       "/CN=sidecar-test-ca", "-keyout", "ca.key", "-out", "ca.crt"])
    with open(os.path.join(d, "tls.ext"), "w") as f:
        f.write("subjectAltName=%s\nextendedKeyUsage=serverAuth\n" %
                ",".join("DNS:" + n for n in SERVER_NAMES))
    ok(["openssl", "req"] + ec + ["-subj", "/CN=" + SERVER_NAMES[0],
       "-keyout", "tls.key", "-out", "tls.csr"])
    ok(["openssl", "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt",
        "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile",
        "tls.ext", "-out", "tls.crt"])
    return d
