"""JUnit XML for CI systems: one testcase per task, failures and errors carrying the gate's numbers.

A FAIL (a regression, or an inconclusive task counted as fail) is a <failure>; an infrastructure error an
<error>; an inconclusive task counted as pass is <skipped> (visible as undecided, not green), as is a task not
compared (--allow-missing-tasks). Command-line settings that replaced the run's recorded gate settings are
<properties> of the suite and are repeated in each affected testcase's text.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

from evalpipe.gate import GateResult, headline

SUITE_NAME = "evalpipe.gate"


def junit_xml(result: GateResult, suite_name: str = SUITE_NAME, *, overrides: Sequence[Mapping[str, Any]] = (),
              not_compared: Mapping[str, str] | None = None) -> str:
    """A <testsuites> document (see the module doc)."""
    decisions = list(result.decisions.values())
    not_compared = dict(not_compared or {})
    skipped = [d for d in decisions if d.status == "pass" and d.counted_as is not None]
    counts = {
        "tests": str(len(decisions) + len(not_compared)),
        "failures": str(sum(d.status == "fail" for d in decisions)),
        "errors": str(sum(d.status == "error" for d in decisions)),
        "skipped": str(len(skipped) + len(not_compared)),
    }
    root = ET.Element("testsuites", {"name": suite_name, **counts})
    suite = ET.SubElement(root, "testsuite", {"name": suite_name, **counts})
    if overrides:
        properties = ET.SubElement(suite, "properties")
        for entry in overrides:
            ET.SubElement(properties, "property", {
                "name": f"override.{entry['setting']}",
                "value": f"{entry['command_line']} (recorded {entry['recorded']}, {entry['recorded_from']}; tasks "
                         f"{', '.join(entry['tasks'])})"})
    for decision in decisions:
        case = ET.SubElement(suite, "testcase", {"classname": suite_name, "name": decision.task})
        line = headline(decision.shown, decision.counted_as, decision.uninformative)
        changed = [f"override from the command line: {e['setting']} {e['command_line']} (recorded {e['recorded']})"
                   for e in overrides if decision.task in e["tasks"]]
        text = "\n".join([f"{line} - {decision.summary}", *decision.reasons, *changed])
        if decision.status == "fail":
            first = decision.reasons[0] if decision.reasons else decision.verdict
            kind = "regression" if decision.counted_as is None else "inconclusive"
            ET.SubElement(case, "failure", {"message": f"{line}: {first}", "type": kind}).text = text
        elif decision.status == "error":
            ET.SubElement(case, "error", {"message": decision.reasons[0], "type": "infrastructure"}).text = text
        elif decision.counted_as is not None:
            ET.SubElement(case, "skipped", {"message": line}).text = text
        else:
            ET.SubElement(case, "system-out").text = text
    for task, why in not_compared.items():
        case = ET.SubElement(suite, "testcase", {"classname": suite_name, "name": task})
        ET.SubElement(case, "skipped", {"message": f"NOT COMPARED - {why}"})
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
