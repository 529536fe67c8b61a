"""A JUnit report reads into {classname::name: status}, the worst status winning for a test
reported twice; anything that is not a report is refused by name."""

import pytest

from dsv32.synth.junit import JUnitError, read_junit

REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
  <testcase classname="tests.test_a" name="test_ok" time="0.001"/>
  <testcase classname="tests.test_a" name="test_bad" time="0.001"><failure message="assert 1 == 2">...</failure></testcase>
  <testcase classname="tests.test_a.TestK" name="test_p[1-x]" time="0"><skipped message="later"/></testcase>
  <testcase classname="tests.test_a" name="test_teardown" time="0.001"/>
  <testcase classname="tests.test_a" name="test_teardown" time="0.001"><error message="teardown"/></testcase>
</testsuite></testsuites>"""


def test_each_testcase_gets_its_status_and_a_teardown_error_outranks_a_pass():
    assert read_junit(REPORT) == {
        "tests.test_a::test_ok": "passed",
        "tests.test_a::test_bad": "failed",
        "tests.test_a.TestK::test_p[1-x]": "skipped",
        "tests.test_a::test_teardown": "error",
    }


def test_a_single_testsuite_root_is_a_report_too():
    assert read_junit('<testsuite><testcase classname="m" name="t"/></testsuite>') == {"m::t": "passed"}


@pytest.mark.parametrize("text, words", [("not xml", "not XML"), ("<html><body/></html>", "<html>")])
def test_what_is_not_a_report_is_refused_saying_why(text, words):
    with pytest.raises(JUnitError, match=words):
        read_junit(text)
