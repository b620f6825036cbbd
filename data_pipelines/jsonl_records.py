"""JSON-lines files of records (evaluation sets, code sets): read them strictly, line by line.

A silently skipped line shortens an evaluation set or a prompt pool and changes every number after
it, so a malformed line is an error that names the file, the line and the fix (DataConfigError).
"""

import json
from pathlib import Path
from typing import Any, Iterator

from data_pipelines.errors import DataConfigError


def json_objects(path: Path, describe: str, limit: int | None = None) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """``(line number, where, object)`` for the first ``limit`` non-blank lines (all if None);
    ``where`` ("<describe> line N") starts the caller's own error messages about that line."""
    count = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and count >= limit:
                return
            if not line.strip():
                continue
            where = f"{describe} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataConfigError(f"{where}: not valid JSON ({exc.msg}); fix or remove the line") from None
            if not isinstance(row, dict):
                raise DataConfigError(f"{where}: expected a JSON object, got {type(row).__name__}")
            count += 1
            yield lineno, where, row


def check_unique(seen: dict[str, int], record_id: str, where: str, lineno: int) -> None:
    """Record ``record_id`` as first seen on ``lineno``; a second time is an error."""
    if record_id in seen:
        raise DataConfigError(f"{where}: duplicate id {record_id!r} (first on line {seen[record_id]}); "
                              f"ids must be unique")
    seen[record_id] = lineno
