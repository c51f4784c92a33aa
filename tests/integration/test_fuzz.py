"""schemathesis over the whole published OpenAPI schema, against the running service with
a valid key (a tenant of its own): no server error, no response outside the schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import KEYS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# positive_data_acceptance is left out: it counts a 4xx for a request that fits the schema
# as a failure, and three refusals here are right but beyond what a schema can say: an
# upload that is not a zip, a backbone whose weights are not installed, base64 that does
# not decode (docs/benchmarks.md, fuzzing).
EXCLUDED_CHECKS = "positive_data_acceptance"


def test_the_schema_holds_under_schemathesis(service, tmp_path):
    schemathesis = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [str(schemathesis), "run", f"{service.base_url}/openapi.json",
         "-H", f"Authorization: Bearer {KEYS['fuzz']}", "--checks", "all",
         "--exclude-checks", EXCLUDED_CHECKS, "--max-examples", "5", "--seed", "1",
         "--request-timeout", "60", "--no-color"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
