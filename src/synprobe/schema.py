"""The version every JSON object synprobe prints carries (``schema_version``), and where
its JSON Schema files are (docs/schema/). The promise (README "JSON schemas"): within a
major version keys are only added, never renamed or removed, and a key keeps its type;
the minor number may grow as keys are added, so a consumer checks the major only."""

from __future__ import annotations

SCHEMA_VERSION = "1.0"
SCHEMAS = {"punch": "punch.schema.json", "nat-check": "natcheck.schema.json",
           "analyze": "analyze.schema.json", "report": "report-manifest.schema.json"}
