"""``sparsebench capture``: record the q, k and v of chosen layers of a local Hugging Face model
(sparsebench.inputs.capture) into a safetensors file that a scenario reads with ``inputs: {kind:
file, path: ...}``. ``register(app)`` adds the command; transformers is imported only when it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sparsebench.cli.app import console, guarded
from sparsebench.errors import ScenarioError


def parse_layers(text: str | None) -> list[int] | None:
    """'0,8,15' -> [0, 8, 15]; None for all layers; ScenarioError for anything else."""
    if text is None:
        return None
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ScenarioError(f"--layers {text!r}: expected layer numbers separated by commas, e.g. 0,8,15") from None
    if not layers or any(x < 0 for x in layers):
        raise ScenarioError(f"--layers {text!r}: expected layer numbers >= 0 separated by commas, e.g. 0,8,15")
    return layers


def register(app: typer.Typer) -> None:
    @app.command("capture")
    def capture(
        model_dir: Path = typer.Argument(..., help="A local Hugging Face model folder (config.json and weights)."),
        text: Optional[Path] = typer.Option(None, "--text", help="Text file, tokenized by the folder's tokenizer."),
        ids: Optional[Path] = typer.Option(None, "--ids", help="Token ids instead (whitespace-separated integers)."),
        layers: Optional[str] = typer.Option(None, "--layers", help="Layers to record, e.g. 0,8,15 (default: all)."),
        tokens: Optional[int] = typer.Option(None, "--tokens", "-n", help="Record the first N tokens (default: all)."),
        out: Path = typer.Option(Path("qkv.safetensors"), "--out", "-o", help="The safetensors file to write."),
    ) -> None:
        """Record post-rotary q, k and the v of a local model's layers for `inputs: {kind: file}`."""
        with guarded():
            from sparsebench.inputs import capture as recorder

            chosen = parse_layers(layers)
            got = recorder.read_tokens(model_dir, text=text, ids=ids, tokens=tokens)
            meta = recorder.capture(model_dir, got, chosen, out)
            size = out.stat().st_size
            console().print(
                f"{out}: layers {meta['layers'].replace(',', ', ')} of {meta['model']}, {meta['tokens']} tokens, "
                f"{meta['heads']} heads over {meta['kv_heads']} KV heads of head_dim {meta['head_dim']} "
                f"({size / 2**20:.1f} MiB); scores: {meta['scores']}",
                soft_wrap=True,
            )
            console().print(
                f"in a scenario: heads: {meta['heads']}, kv_heads: {meta['kv_heads']}, head_dim: {meta['head_dim']}, "
                f"inputs: {{kind: file, path: {out}}} (seq_lens up to {meta['tokens']})",
                soft_wrap=True,
            )
