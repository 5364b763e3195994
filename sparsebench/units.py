"""Units, one place for each: byte sizes, times, token counts (parse and format), ratios and
percentages, and the element types (dtype names, their widths, their torch dtypes).

Every formatter takes None (or a non-finite number) and writes "-", the empty cell of the
tables. torch is imported only by ``torch_dtype``.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from sparsebench.errors import ScenarioError

EMPTY = "-"

# -- byte sizes ---------------------------------------------------------------------------------

# binary units, largest first: what every formatter writes
BINARY_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
# what parse_bytes reads (lower case): binary and decimal units
_BYTE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_TOKEN_UNITS = {"": 1, "k": 1024, "m": 1024**2}
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
# commas in a number: thousands separators only (131,072 or 1,048,576)
_GROUPED = re.compile(r"^\s*\d{1,3}(?:,\d{3})+(?:\.\d*)?\s*[A-Za-z]*\s*$")


def _split(text: str) -> tuple[Decimal, str] | None:
    """ "24 GiB" -> (Decimal(24), "gib"); None when it is not a number with an optional unit."""
    text = str(text)
    if "," in text and not _GROUPED.match(text):  # "1,5GiB" is not 15 GiB
        return None
    m = _NUMBER.match(text.replace("_", "").replace(",", ""))
    if not m:
        return None
    try:
        return Decimal(m.group(1)), m.group(2).lower()
    except InvalidOperation:
        return None


def parse_bytes(text: str | int) -> int:
    """A byte size: ``24GiB`` (2**30), ``80GB`` (10**9), MiB/MB, KiB/KB, TiB/TB, ``1000B``; an
    int is bytes. A number without a unit in text is refused (``--budget 24`` is not 24 bytes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = Decimal(text)
    else:
        parts = _split(str(text))
        if parts is None:
            raise ScenarioError(f"invalid size {str(text)!r}: expected a number with a unit such as 24GiB or 80GB")
        number, unit = parts
        if unit == "":
            raise ScenarioError(
                f"size {str(text)!r} has no unit: write {number}GiB (binary), {number}GB (decimal) or {number}B (bytes)"
            )
        if unit in ("k", "m", "g", "t"):
            u = unit.upper()
            raise ScenarioError(
                f"ambiguous unit in size {str(text)!r}: write {number}{u}iB (binary) or {number}{u}B (decimal)"
            )
        if unit not in _BYTE_UNITS:
            raise ScenarioError(
                f"invalid size {str(text)!r}: unknown unit {unit!r}; expected B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
            )
        value = number * _BYTE_UNITS[unit]
    if value < 1:
        raise ScenarioError(f"invalid size {str(text)!r}: must be at least 1 byte")
    return int(value)


def format_bytes(n: float | None, spec: str = ".3g") -> str:
    """3 * 2**30 -> '3 GiB', 1536 -> '1.5 KiB', 512 -> '512 B': the largest binary unit the size
    reaches, the number in the format ``spec`` (three significant digits unless told; the KV
    planner's table asks for '.2f', two fixed decimals that line up in a column)."""
    if not _finite(n):
        return EMPTY
    n = float(n)  # type: ignore[arg-type]
    for unit, scale in BINARY_UNITS:
        if abs(n) >= scale:
            return f"{n / scale:{spec}} {unit}"
    return f"{int(n)} B"


# -- times --------------------------------------------------------------------------------------

_TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9))


def format_time(s: float | None) -> str:
    """0.00123 -> '1.23 ms', 2.0 -> '2 s', -0.002 -> '-2 ms': three significant digits in the
    largest unit the time reaches. A time that rounds up to the next unit is written in it
    (0.9996 s is '1 s', not '1e+03 ms'); this also keeps an axis tick a hair below a decade,
    from floating point, on the decade's unit."""
    if not _finite(s):
        return EMPTY
    s = float(s)  # type: ignore[arg-type]
    for unit, scale in _TIME_UNITS:
        if abs(s) >= scale * (1 - 5e-4):
            return f"{s / scale:.3g} {unit}"
    return f"{s:.3g} s"


# -- token counts -------------------------------------------------------------------------------


def parse_tokens(text: str | int) -> int:
    """A token count: ``131072``, ``128k`` (k = 1024) or ``1m`` (m = 1024**2)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: Decimal | int = text
    else:
        parts = _split(str(text))
        if parts is None or parts[1] not in _TOKEN_UNITS:
            raise ScenarioError(f"invalid token count {str(text)!r}: expected an integer such as 131072 or 128k")
        value = parts[0] * _TOKEN_UNITS[parts[1]]
        if value != int(value):
            raise ScenarioError(f"invalid token count {str(text)!r}: not a whole number of tokens")
    if int(value) < 1:
        raise ScenarioError(f"invalid token count {str(text)!r}: must be at least 1")
    return int(value)


def format_tokens(n: float | None, short: bool = False) -> str:
    """A token count as the exact integer: 131072 -> '131072' (an interpolated length is
    rounded); ``short`` adds the form parse_tokens reads when it is shorter: '131072 (128k)'."""
    if not _finite(n):
        return EMPTY
    text = f"{int(round(float(n)))}"  # type: ignore[arg-type]
    compact = short_tokens(n) if short else text
    return text if compact == text else f"{text} ({compact})"


def short_tokens(n: float | None) -> str:
    """131072 -> '128k', 1048576 -> '1m', 4100 -> '4100': whole multiples of 1024 and 1024**2
    with the suffix parse_tokens reads, other counts as they are, so the text reads back as the
    exact count (the figures' compact '1.5K' is render.plots' own)."""
    if not _finite(n):
        return EMPTY
    v = float(n)  # type: ignore[arg-type]
    for unit, scale in (("m", 1024**2), ("k", 1024)):
        if v >= scale and v % scale == 0:
            return f"{int(v) // scale}{unit}"
    return f"{int(v)}" if v.is_integer() else f"{v:g}"


# -- ratios -------------------------------------------------------------------------------------


def format_ratio(r: float | None) -> str:
    """1.234 -> '1.23x'."""
    return EMPTY if not _finite(r) else f"{r:.2f}x"


def format_percent(r: float | None) -> str:
    """A fraction as a percentage: 0.456 -> '46%'."""
    return EMPTY if not _finite(r) else f"{100 * r:.0f}%"  # type: ignore[operator]


# -- element types ------------------------------------------------------------------------------

# Every dtype name sparsebench knows, with its width; the KV planner takes them all, the
# attention kernels the COMPUTE_DTYPES.
DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float8": "fp8"}
# the dtypes a scenario measures attention in, each with the name of its torch dtype
COMPUTE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def canonical_dtype(name: str, kind: str = "dtype", choices: Any = DTYPE_BITS) -> str:
    """'bfloat16' -> 'bf16'; a name not in ``choices`` is a ScenarioError naming ``kind``."""
    key = str(name).strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in choices:
        from sparsebench.registry import unknown_choice

        raise ScenarioError(unknown_choice(kind, name, choices))
    return key


def dtype_bits(name: str) -> int:
    """Bits per element: fp32 32, fp16/bf16 16, fp8/int8 8, int4 4."""
    return DTYPE_BITS[canonical_dtype(name)]


def dtype_bytes(name: str) -> float:
    """Bytes per element: fp32 4, fp16/bf16 2, fp8/int8 1, int4 0.5."""
    return dtype_bits(name) / 8


def torch_dtype(name: str, kind: str = "dtype"):
    """The torch dtype of a compute dtype name ('bf16' or 'bfloat16' -> torch.bfloat16); another
    name is a ScenarioError naming ``kind``."""
    import torch

    return getattr(torch, COMPUTE_DTYPES[canonical_dtype(name, kind, COMPUTE_DTYPES)])


def _finite(v: Any) -> bool:
    if v is None:
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
