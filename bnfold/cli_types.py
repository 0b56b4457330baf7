"""Click parameter types of bnfold's commands that are more than a built-in type: what a user may
write for them, and the one-line error (exit 2) for what they may not."""

from __future__ import annotations

import math

import click

__all__ = ["ByteSize"]


class ByteSize(click.ParamType):
    """A size in bytes: a number, optionally with K, M or G (powers of 1024), e.g. ``64M``."""

    name = "size"
    _UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in "KMG" and text[-1:] else ""
        number = text[: len(text) - len(unit)]
        try:
            size = float(number) * self._UNITS[unit]
        except ValueError:
            size = math.nan
        if not math.isfinite(size):  # also inf, nan, 1e400
            self.fail(f"{value!r} is not a size (a number of bytes, or with K, M or G: 64M)", param, ctx)
        if size < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return int(size)
