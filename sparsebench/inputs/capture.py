"""Record the q, k and v a local Hugging Face model's attention layers receive, for ``kind: file``.

transformers lets a model's attention call a registered function (``AttentionInterface``); the
one registered here receives each layer's query, key and value states after the rotary
embedding and before grouped-query attention repeats k and v (so k and v keep the model's KV
heads), keeps those of the chosen layers, and hands them on to transformers' own SDPA
attention, so the forward pass is the model's. Weights are read from a local folder only
(``local_files_only``): nothing is downloaded.

Where a model scales its scores by something other than 1/sqrt(head_dim) (Gemma's
``query_pre_attn_scalar``), q is recorded multiplied by scale x sqrt(head_dim), so that the
benchmark's 1/sqrt(head_dim) gives the model's scores; the metadata says so. A logit soft-cap
(Gemma 2) cannot be carried by q, k and v: the metadata names it. transformers is imported only
when a capture runs (the ``[hf]`` extra)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from sparsebench.errors import ScenarioError, SparsebenchError
from sparsebench.inputs.file import HF_EXTRA

ATTENTION_NAME = "sparsebench_capture"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

_recording: dict | None = None  # while a capture runs: wanted layers and what they received


@dataclass(frozen=True)
class Tokens:
    """The token ids to run and where they came from (the digest of the text or ids file)."""

    ids: list[int]
    source: str
    sha256: str


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SparsebenchError(f"sparsebench capture needs transformers; {HF_EXTRA}") from None
    return transformers


def read_tokens(model_dir: Path, *, text: Path | None, ids: Path | None, tokens: int | None) -> Tokens:
    """The first ``tokens`` token ids of ``text`` (tokenized by the model folder's own tokenizer)
    or of ``ids`` (whitespace-separated integers); ScenarioError naming the option otherwise."""
    if (text is None) == (ids is None):
        raise ScenarioError("give the input as --text FILE (tokenized by the model's tokenizer) or --ids FILE")
    path = Path(text if text is not None else ids)
    if not path.is_file():
        raise ScenarioError(f"{'--text' if text is not None else '--ids'} {path}: no such file")
    data = path.read_bytes()
    if ids is not None:
        try:
            got = [int(x) for x in data.decode("utf-8").split()]
        except (UnicodeDecodeError, ValueError):
            raise ScenarioError(f"--ids {path}: expected whitespace-separated integer token ids") from None
    else:
        if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
            raise ScenarioError(
                f"{model_dir} has no tokenizer ({', '.join(TOKENIZER_FILES)}); give token ids instead: --ids FILE"
            )
        tf = _transformers()
        try:
            tok = tf.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            raise ScenarioError(f"{model_dir}: cannot load its tokenizer ({_first_line(exc)})") from None
        got = list(tok(data.decode("utf-8", errors="replace"))["input_ids"])
    if not got:
        raise ScenarioError(f"{path}: gives no tokens")
    if tokens is not None:
        if tokens < 1:
            raise ScenarioError(f"--tokens must be at least 1, got {tokens}")
        if len(got) < tokens:
            raise ScenarioError(f"{path} gives {len(got)} tokens; --tokens {tokens} asks for more")
        got = got[:tokens]
    return Tokens(got, str(path), hashlib.sha256(data).hexdigest())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _record(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: keeps the wanted layers' states, then SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec = _recording
    layer = getattr(module, "layer_idx", None)
    if rec is not None and layer in rec["wanted"]:
        d = query.shape[-1]
        scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or d**-0.5
        q = query.detach().float().cpu()
        if not math.isclose(scaling, d**-0.5, rel_tol=1e-6):
            q = q * (scaling * math.sqrt(d))  # the benchmark's 1/sqrt(d) then gives the model's scores
            rec["notes"].add(f"q prescaled: the model scales scores by {scaling:g}, not 1/sqrt({d})")
        if kwargs.get("softcap") is not None:
            rec["notes"].add(f"logit softcap {kwargs['softcap']:g} not carried by q, k, v")
        if kwargs.get("sliding_window") is not None:
            rec["notes"].add(f"layer {layer}: the model attends a sliding window of {kwargs['sliding_window']}")
        rec["layers"][layer] = (q, key.detach().float().cpu(), value.detach().float().cpu())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def capture(model_dir: Path, tokens: Tokens, layers: list[int] | None, out: Path) -> dict[str, str]:
    """Run the model of ``model_dir`` on ``tokens`` and write the chosen ``layers`` (default:
    all) to ``out`` (sparsebench.inputs.file's format). Returns the file's metadata."""
    global _recording
    tf = _transformers()
    import torch

    from sparsebench.inputs import file

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ScenarioError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    try:
        config = tf.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ScenarioError(f"{model_dir}/config.json: cannot read it ({_first_line(exc)})") from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text_config, "num_hidden_layers", None)
    if not count:
        raise ScenarioError(f"{model_dir}/config.json: no num_hidden_layers (not a decoder transformers can run)")
    wanted = sorted(set(layers)) if layers else list(range(count))
    bad = [layer for layer in wanted if not 0 <= layer < count]
    if bad:
        raise ScenarioError(f"--layers {bad[0]}: the model has {count} layers (0-{count - 1})")
    tf.AttentionInterface.register(ATTENTION_NAME, _record)
    tf.utils.logging.disable_progress_bar()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(
            str(model_dir), local_files_only=True, attn_implementation=ATTENTION_NAME, dtype=torch.float32
        )
    except Exception as exc:  # noqa: BLE001
        raise ScenarioError(f"{model_dir}: cannot load the model ({_first_line(exc)})") from None
    model.eval()
    _recording = {"wanted": set(wanted), "layers": {}, "notes": set()}
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([tokens.ids]), use_cache=False)
        got, notes = _recording["layers"], sorted(_recording["notes"])
    finally:
        _recording = None
    missing = [layer for layer in wanted if layer not in got]
    if missing:
        raise SparsebenchError(
            f"{model_dir}: layers {', '.join(map(str, missing))} did not call the attention interface "
            "(not a softmax attention layer transformers dispatches)"
        )
    q, k, _ = got[wanted[0]]
    meta = {
        "model": model_dir.resolve().name,
        "model_type": str(getattr(config, "model_type", "")),
        "architectures": ",".join(getattr(config, "architectures", None) or []),
        "tokens": str(len(tokens.ids)),
        "text": Path(tokens.source).name,
        "text_sha256": tokens.sha256,
        "heads": str(q.shape[1]),
        "kv_heads": str(k.shape[1]),
        "head_dim": str(q.shape[-1]),
        "scores": "q . k / sqrt(head_dim), as the model's" if not notes else "; ".join(notes),
        "transformers": tf.__version__,
    }
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise ScenarioError(f"--out {out}: folder {out.parent} does not exist")
    file.write(str(out), got, meta)
    return {"format": file.FORMAT, "layers": ",".join(map(str, wanted)), **meta}
