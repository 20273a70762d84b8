#!/usr/bin/env python3
"""tests/deploy/containerfile_test.py — static checks of the Containerfile.

Building the image takes minutes and a registry or debootstrap, so CI
checks the Containerfile instead: the builder stage's RUN steps are exactly
the commands CI runs (scripts/setup, then the Bazel build line below), the
runtime stage installs no build tools, runs as a fixed non-root UID, has a
HEALTHCHECK through the client, and starts blockmetad with --config.

Usage (Bazel passes it): containerfile_test.py [CI_FILE...]
Each CI_FILE (a CI workflow or script) must contain CI_BUILD verbatim, so
CI and the image cannot drift apart.
"""

import json
import os
import re
import shlex
import sys
import unittest

CONTAINERFILE = "deploy/container/Containerfile"
# The commands CI runs; the image's builder stage must run the same.
CI_SETUP = "scripts/setup"
CI_BUILD = "bazel build --config=opt //server:blockmetad //client:blockmeta"
RUNTIME_UID = 65532

CI_FILES = []


def parse(path):
    """Containerfile -> list of stages, each a list of (INSTRUCTION, args)."""
    with open(path) as f:
        text = f.read()
    # Join continuation lines, drop comments and blank lines.
    logical, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1].strip() + " "
            continue
        logical.append((buf + stripped).strip())
        buf = ""
    if buf:
        raise AssertionError("dangling line continuation")
    stages, preamble = [], []
    for instr in logical:
        op, _, args = instr.partition(" ")
        op = op.upper()
        if op == "FROM":
            stages.append([(op, args.strip())])
        elif not stages:
            preamble.append((op, args.strip()))
        else:
            stages[-1].append((op, args.strip()))
    return preamble, stages


class ContainerfileTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.preamble, cls.stages = parse(CONTAINERFILE)
        cls.by_name = {}
        for s in cls.stages:
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", s[0][1], re.I)
            cls.by_name[m.group(2)] = s

    def ops(self, stage, op):
        return [a for o, a in stage if o == op]

    def test_two_stages_on_bookworm(self):
        self.assertEqual(set(self.by_name), {"builder", "runtime"})
        self.assertIs(self.stages[-1], self.by_name["runtime"],
                      "the runtime stage must be the last (the default target)")
        base = [a for o, a in self.preamble if o == "ARG"]
        self.assertEqual(len(base), 1)
        name, _, default = base[0].partition("=")
        self.assertRegex(default, r"debian:bookworm$")
        for s in self.stages:
            self.assertTrue(s[0][1].startswith("${%s}" % name),
                            "stage not FROM the bookworm base: %s" % s[0][1])

    def test_builder_runs_the_ci_commands(self):
        runs = self.ops(self.by_name["builder"], "RUN")
        self.assertIn(CI_SETUP, runs)
        self.assertIn(CI_BUILD, runs)
        self.assertLess(runs.index(CI_SETUP), runs.index(CI_BUILD))
        # Nothing else builds: no second bazel or setup invocation with
        # other flags hiding in a compound step.
        for r in runs:
            if r not in (CI_SETUP, CI_BUILD):
                self.assertNotRegex(r, r"\bbazel\s+\w|scripts/setup", r)
        # scripts/setup is copied before it runs.
        builder = self.by_name["builder"]
        copy_idx = builder.index(("COPY", "scripts/setup scripts/setup"))
        self.assertLess(copy_idx, builder.index(("RUN", CI_SETUP)))

    def test_ci_files_run_the_same_build(self):
        for path in CI_FILES:
            with self.subTest(ci_file=path), open(path) as f:
                text = f.read()
                self.assertIn(CI_BUILD, text)
                self.assertIn(CI_SETUP, text)

    def test_runtime_is_slim(self):
        runtime = self.by_name["runtime"]
        text = " ".join(a for o, a in runtime if o == "RUN")
        self.assertNotRegex(text, r"scripts/setup|\bbazel\b|-dev\b|\bg\+\+|clang")
        self.assertIn("runtime-packages.txt", text)
        self.assertIn("--no-install-recommends", text)
        self.assertIn("rm -rf /var/lib/apt/lists/*", text)
        # Only the two binaries come from the builder (plus the list).
        for a in self.ops(runtime, "COPY"):
            if a.startswith("--from="):
                self.assertRegex(a, r"^--from=builder /out/(blockmetad /out/blockmeta "
                                 r"/usr/local/bin/|runtime-packages\.txt \S+)$")

    def test_runs_as_fixed_non_root(self):
        users = self.ops(self.by_name["runtime"], "USER")
        self.assertEqual(users, ["%d:%d" % (RUNTIME_UID, RUNTIME_UID)])
        text = " ".join(self.ops(self.by_name["runtime"], "RUN"))
        self.assertIn("--uid %d" % RUNTIME_UID, text)

    def test_healthcheck_uses_the_client(self):
        hc = self.ops(self.by_name["runtime"], "HEALTHCHECK")
        self.assertEqual(len(hc), 1)
        m = re.search(r"CMD\s+(\[.*\])", hc[0])
        self.assertIsNotNone(m, "HEALTHCHECK without an exec-form CMD")
        self.assertEqual(json.loads(m.group(1)),
                         ["/usr/local/bin/blockmeta", "health",
                          "--server=unix:/run/blockmeta/grpc.sock"])
        # The default config enables that socket.
        with open("deploy/container/config.textproto") as f:
            self.assertRegex(f.read(), r'(?m)^grpc_unix_socket: '
                             r'"/run/blockmeta/grpc.sock"$')

    def test_entrypoint(self):
        ep = self.ops(self.by_name["runtime"], "ENTRYPOINT")
        self.assertEqual(len(ep), 1)
        self.assertEqual(json.loads(ep[0]),
                         ["/usr/local/bin/blockmetad",
                          "--config=/etc/blockmeta/config.textproto"])
        self.assertIn(("STOPSIGNAL", "SIGTERM"), self.by_name["runtime"])
        self.assertIn(("COPY", "deploy/container/config.textproto "
                       "/etc/blockmeta/config.textproto"),
                      self.by_name["runtime"])

    def test_copied_sources_exist(self):
        for s in self.stages:
            for a in self.ops(s, "COPY"):
                if a.startswith("--from="):
                    continue
                for src in shlex.split(a)[:-1]:
                    # scripts/setup is not in this test's runfiles (no
                    # package exports it); the image build itself needs it.
                    if src not in (".", CI_SETUP):
                        self.assertTrue(os.path.exists(src), src)


if __name__ == "__main__":
    CI_FILES.extend(sys.argv[1:])
    unittest.main(argv=sys.argv[:1], verbosity=2)
