"""sparsebench.units: byte sizes, times and token counts (parse and format), ratios, dtypes."""

from __future__ import annotations

import math

import pytest

from sparsebench.errors import ScenarioError
from sparsebench.units import (
    canonical_dtype,
    dtype_bits,
    dtype_bytes,
    format_bytes,
    format_percent,
    format_ratio,
    format_time,
    format_tokens,
    parse_bytes,
    parse_tokens,
    short_tokens,
    torch_dtype,
)

# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("131072", 131072),
        ("128k", 131072),
        ("128K", 131072),
        ("1m", 1048576),
        ("1.5k", 1536),
        (4096, 4096),
        ("32_768", 32768),
    ],
)
def test_parse_tokens(text, value):
    assert parse_tokens(text) == value


@pytest.mark.parametrize("text", ["abc", "0", "-5", "1.3k", "12g", "", "k"])
def test_parse_tokens_errors(text):
    with pytest.raises(ScenarioError, match="invalid token count"):
        parse_tokens(text)


@pytest.mark.parametrize(
    "text, value",
    [
        ("24GiB", 24 * 2**30),
        ("24 gib", 24 * 2**30),
        ("80GB", 80 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("2TiB", 2 * 2**40),
        ("1TB", 10**12),
        ("64KiB", 65536),
        ("64KB", 64000),
        ("1000B", 1000),
        (4096, 4096),
    ],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_errors():
    with pytest.raises(ScenarioError, match="ambiguous unit in size '24G': write 24GiB .* or 24GB"):
        parse_bytes("24G")
    with pytest.raises(ScenarioError, match="invalid size 'lots'"):
        parse_bytes("lots")
    with pytest.raises(ScenarioError, match="unknown unit 'xb'"):
        parse_bytes("5XB")
    with pytest.raises(ScenarioError, match="at least 1 byte"):
        parse_bytes("0GiB")
    # a forgotten unit is not read as bytes (--budget 24 would fit nothing)
    with pytest.raises(ScenarioError, match="size '24' has no unit: write 24GiB .*, 24GB .* or 24B"):
        parse_bytes("24")
    # a comma groups thousands, and is never a decimal point
    assert parse_bytes("1,048,576B") == 2**20
    with pytest.raises(ScenarioError, match="invalid size '1,5GiB'"):
        parse_bytes("1,5GiB")


# -- formatting ---------------------------------------------------------------------------------


def test_formatters():  # the table formats
    assert format_time(0.00123) == "1.23 ms" and format_time(2.0) == "2 s" and format_time(None) == "-"
    assert format_bytes(3 * 2**30) == "3 GiB" and format_bytes(512) == "512 B"


def test_format_bytes():
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(1536, ".2f") == "1.50 KiB"
    assert format_bytes(2 * 2**40) == "2 TiB" and format_bytes(0) == "0 B"
    assert format_bytes(None) == "-" and format_bytes(math.nan) == "-" and format_bytes(math.inf) == "-"


def test_format_time_units_and_rounding():
    assert format_time(-0.002) == "-2 ms" and format_time(3e-6) == "3 µs" and format_time(5e-10) == "5e-10 s"
    # a time that rounds up to the next unit is written in it, never as "1e+03 ms"
    assert format_time(0.9996) == "1 s" and format_time(0.999) == "999 ms"
    assert format_time(math.inf) == "-"


def test_token_counts():
    assert format_tokens(131072) == "131072" and format_tokens(1023.6) == "1024" and format_tokens(None) == "-"
    assert format_tokens(131072, short=True) == "131072 (128k)" and format_tokens(4100, short=True) == "4100"
    assert format_tokens(2**20, short=True) == "1048576 (1m)"
    assert short_tokens(131072) == "128k" and short_tokens(3 * 2**20) == "3m" and short_tokens(1536) == "1536"
    assert short_tokens(2**48) == f"{2**28}m"  # never in exponent notation
    for n in (1, 4100, 131072, 2**20, 3 * 2**30):
        assert parse_tokens(short_tokens(n)) == n  # the short form reads back as the count


def test_ratio_and_percent():
    assert format_ratio(1.234) == "1.23x" and format_ratio(None) == "-" and format_ratio(math.nan) == "-"
    assert format_percent(0.456) == "46%" and format_percent(None) == "-"


# -- dtypes -------------------------------------------------------------------------------------


def test_dtypes():
    assert canonical_dtype("bfloat16") == "bf16" and canonical_dtype(" FP16 ") == "fp16"
    assert dtype_bits("int4") == 4 and dtype_bytes("fp32") == 4 and dtype_bytes("half") == 2
    with pytest.raises(ScenarioError, match="KV-cache dtype"):
        canonical_dtype("fp64", "KV-cache dtype")


def test_torch_dtype():
    import torch

    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("float32") is torch.float32
    assert torch_dtype("fp16") is torch.float16
    with pytest.raises(ScenarioError):
        torch_dtype("int8")  # a cache dtype, not one attention is computed in


def test_no_torch_at_import():
    import subprocess
    import sys

    code = "import sys, sparsebench.units, sparsebench.stats; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
