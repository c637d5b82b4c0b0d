"""Run the test suite and fail when nothing ran.

pytest exits 0 with every test skipped and 5 with none collected; CI must treat
both as failure, or a broken fixture could land as green.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", f"--junitxml={report}", *sys.argv[1:]]
        rc = subprocess.call(cmd)
        if rc != 0:
            return rc
        if not report.exists():
            print("run_tests: pytest wrote no report; treating as failure", file=sys.stderr)
            return 1
        root = ET.parse(report).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        ran = sum(int(s.get("tests", 0)) - int(s.get("skipped", 0)) for s in suites)
        if ran <= 0:
            print("run_tests: no test was executed; treating as failure", file=sys.stderr)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
