"""Transforms loaded by import path in tests (the consumer's --transform option)."""

from __future__ import annotations

from typing import Any


def refuse_poison(payload: dict[str, Any]) -> dict[str, Any]:
    if payload.get("poison"):
        raise ValueError("poison record")
    return payload
