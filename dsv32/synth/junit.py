"""JUnit XML, the one test-report format every environment emits (spec §5, "Code agent": results
in JUnit format so parsing is uniform across languages and frameworks).

A report is read into {test id: status}: the id is `classname::name` (pytest writes the dotted
module and class as classname and the function with its parameters as name), the status one of
`passed`, `failed`, `error`, `skipped`. A test that appears twice (pytest adds a teardown error to
a test that passed) keeps its worst status.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

STATUSES = ("passed", "skipped", "failed", "error")  # best to worst
MAX_BYTES = 64 << 20


class JUnitError(ValueError):
    """The report is missing, too large, or not JUnit XML."""


def read_junit(xml: str | bytes) -> dict[str, str]:
    """{`classname::name`: status} for every <testcase> of a JUnit XML report (<testsuites> or a
    single <testsuite> at the root)."""
    if len(xml) > MAX_BYTES:
        raise JUnitError(f"the report has {len(xml)} bytes, more than the {MAX_BYTES} read")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise JUnitError(f"the report is not XML: {e}") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise JUnitError(f"the report's root is <{root.tag}>, not <testsuites> or <testsuite>")
    out: dict[str, str] = {}
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                found = {"failure": "failed"}.get(child.tag, child.tag)
                status = max(status, found, key=STATUSES.index)
        out[test] = max(out.get(test, "passed"), status, key=STATUSES.index)
    return out
