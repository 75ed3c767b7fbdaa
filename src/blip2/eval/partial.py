"""``<output>.partial``: what an interrupted ``blip2 eval`` run keeps, and the check that lets ``--resume``
continue it only with the settings that made it."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["PartialResults", "check_settings"]


class PartialResults:
    """The finished records of a run, kept in ``<output>.partial`` (JSON lines after a settings header).

    Opening with ``resume`` reads what an interrupted run left (a torn last line is dropped) and
    rewrites the file clean; without it the file starts over.
    """

    def __init__(self, path: str, settings: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if resume and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
            header = json.loads(lines[0]) if lines else {}
            check_settings(header.get("settings", {}), settings, path)
            for line in lines[1:]:
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:  # the write an interruption cut short
                    break
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in [{"settings": settings}, *self.records])

    def add(self, records: list[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
        self.records += records

    def remove(self) -> None:
        os.remove(self.path)


def check_settings(then: dict[str, Any], now: dict[str, Any], path: str) -> None:
    """Refuse to resume ``path``, made with settings ``then``, under other settings ``now``."""
    diff = _differences(then, now)
    if diff:
        raise ValueError(f"--resume: {path} was made with other settings ({'; '.join(diff)}); "
                         "rerun with the same ones, or without --resume to start over")


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k} ({x!r} then, {y!r} now)")
    return out
