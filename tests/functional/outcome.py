"""The outcome of one plugin execution, judged as a runtime would see it."""

from __future__ import annotations

import json
from typing import Optional

from tests.spec_shapes import check_error
from vpcni.lab.cluster import CniResult


def ok(res: CniResult) -> CniResult:
    """Success: exit code 0, and no traceback on stderr."""
    assert "Traceback" not in res.stderr, res.stderr
    assert res.rc == 0, f"rc {res.rc}: {res.stdout} {res.stderr}"
    return res


def failed(res: CniResult, version: Optional[str] = None, code: Optional[int] = None) -> dict:
    """Failure: non-zero exit, stdout exactly one error JSON object, no traceback on stderr."""
    assert "Traceback" not in res.stderr, res.stderr
    assert res.rc != 0, f"expected an error, got rc 0: {res.stdout}"
    body = json.loads(res.stdout)
    check_error(body, version)
    if code is not None:
        assert body["code"] == code, body
    return body
