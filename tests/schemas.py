"""Every JSON object the commands print, checked against its published JSON Schema
(docs/schema/; the `jsonschema` package is a test dependency only): the tests parse
command output through ``loads`` / ``check`` so that a key renamed, removed or retyped
fails the test that saw it."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

from synprobe.schema import SCHEMA_VERSION, SCHEMAS

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schema"


@functools.cache
def validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMA_DIR / SCHEMAS[kind]).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def check(kind: str, data: Any) -> Any:
    """``data`` if it matches the schema of ``kind`` (punch, nat-check, analyze, report);
    else the test fails with every error."""
    errors = sorted(validator(kind).iter_errors(data), key=lambda e: list(e.path))
    assert not errors, f"{kind} JSON does not match docs/schema/{SCHEMAS[kind]}:\n" + "\n".join(
        f"  at /{'/'.join(str(p) for p in e.path)}: {e.message}" for e in errors)
    assert data["schema_version"].split(".")[0] == SCHEMA_VERSION.split(".")[0]
    return data


def loads(kind: str, text: str | bytes) -> Any:
    return check(kind, json.loads(text))
