"""Vulnerability audit of the installed, pinned dependencies with pip-audit.

Fails (exit 1) when any installed package has a known vulnerability that is not in
``.ci/audit-allowlist.txt`` (one advisory id per line, ``#`` comments giving the reason).
pip-audit needs PyPI's JSON API (or OSV); where the machine reaches only a package
index mirror, nothing can be audited: that is reported loudly and does not fail the
run, since it says nothing about the dependencies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def allowlist() -> list[str]:
    ids = []
    for line in (HERE / "audit-allowlist.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line)
    return ids


def main() -> int:
    args = [sys.executable, "-m", "pip_audit", "--format", "json", "--progress-spinner", "off"]
    for vuln_id in allowlist():
        args += ["--ignore-vuln", vuln_id]
    done = subprocess.run(args, capture_output=True, text=True)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        print(done.stdout[-2000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
        print("audit: pip-audit gave no report", file=sys.stderr)
        return 1
    deps = report.get("dependencies", [])
    audited = [d for d in deps if "skip_reason" not in d]
    vulnerable = [d for d in audited if d.get("vulns")]
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions", [])) or "none"
            print(f"audit: {dep['name']} {dep['version']}: {vuln['id']} (fixed in: {fixes})", file=sys.stderr)
    print(f"audit: {len(audited)} of {len(deps)} installed packages audited, {len(vulnerable)} vulnerable")
    if deps and not audited:
        print(
            "audit: WARNING: no package could be audited: the vulnerability service (PyPI JSON API / OSV) "
            "is not reachable from this machine",
            file=sys.stderr,
        )
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
