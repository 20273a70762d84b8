#!/usr/bin/env bash
# tests/deploy/run_python3.sh — runs a Python test script with Debian's
# /usr/bin/python3 (which has python3-yaml). Bazel 4.2.3's py_test stub
# starts with `#!/usr/bin/env python`, and this machine has no `python`,
# so the Python tests here are sh_tests through this wrapper.
# Usage: run_python3.sh SCRIPT.py [ARGS...]
set -euo pipefail
[ -x /usr/bin/python3 ] || { echo "FAIL: /usr/bin/python3 missing" >&2; exit 1; }
exec /usr/bin/python3 -B "$@"
