"""A benchmark's result table on stdout: one aligned row per named result, then the JSON of all."""

from __future__ import annotations

import json
from typing import Any


def print_table(title: str, table: dict[str, dict[str, Any]], columns: list[tuple[str, str, str]],
                name_width: int = 34) -> None:
    """`columns`: (key in each row, header, format spec such as ".3f" or "d"); widths follow the headers."""
    widths = [max(len(header) + 2, 7) for _, header, _ in columns]
    print(f"{title:<{name_width}}" + "".join(f"{header:>{w}}" for (_, header, _), w in zip(columns, widths)))
    for name, row in table.items():
        print(f"{name:<{name_width}}" + "".join(f"{row[key]:>{w}{spec}}" for (key, _, spec), w in zip(columns, widths)))
    print(json.dumps(table))
