"""JUnit XML for CI systems: one testcase per task, failures and errors carrying the gate's numbers."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from evalpipe.gate import GateResult

SUITE_NAME = "evalpipe.gate"


def junit_xml(result: GateResult, suite_name: str = SUITE_NAME) -> str:
    """A <testsuites> document; a regression is a <failure>, an infrastructure error an <error>."""
    decisions = list(result.decisions.values())
    counts = {
        "tests": str(len(decisions)),
        "failures": str(sum(d.status == "fail" for d in decisions)),
        "errors": str(sum(d.status == "error" for d in decisions)),
        "skipped": "0",
    }
    root = ET.Element("testsuites", {"name": suite_name, **counts})
    suite = ET.SubElement(root, "testsuite", {"name": suite_name, **counts})
    for decision in decisions:
        case = ET.SubElement(suite, "testcase", {"classname": suite_name, "name": decision.task})
        text = "\n".join([decision.summary, *decision.reasons])
        if decision.status == "fail":
            first = decision.reasons[0] if decision.reasons else decision.verdict
            ET.SubElement(case, "failure", {"message": first, "type": "regression"}).text = text
        elif decision.status == "error":
            ET.SubElement(case, "error", {"message": decision.reasons[0], "type": "infrastructure"}).text = text
        else:
            ET.SubElement(case, "system-out").text = text
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
