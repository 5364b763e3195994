"""``sparsebench kv`` on models as they ship: the published config.json files (their structure
written out below, keys as published, long lists built as they read), read layer by layer, with
byte counts worked out by hand in each test."""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer
from typer.testing import CliRunner

from sparsebench.cli.kv import register
from sparsebench.kv import planner as kvcache

GiB, MiB = 2**30, 2**20
N = 131072  # 128k

# -- the published configs --------------------------------------------------------------------

GPT_OSS_120B = {  # openai/gpt-oss-120b config.json
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "num_local_experts": 128,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens"],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}

DEEPSEEK_V3 = {  # deepseek-ai/DeepSeek-V3 config.json
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

GEMMA_3_27B_IT = {  # google/gemma-3-27b-it config.json (multimodal: the text model in text_config)
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "head_dim": 128,
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "model_type": "gemma3_text",
        "num_attention_heads": 32,
        "num_hidden_layers": 62,
        "num_key_value_heads": 16,
        "query_pre_attn_scalar": 168,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}

LLAMA_4_SCOUT = {  # meta-llama/Llama-4-Scout-17B-16E-Instruct config.json (text model in text_config)
    "architectures": ["Llama4ForConditionalGeneration"],
    "boi_token_index": 200080,
    "eoi_token_index": 200081,
    "image_token_index": 200092,
    "model_type": "llama4",
    "text_config": {
        "attention_bias": False,
        "attention_chunk_size": 8192,
        "attention_dropout": 0.0,
        "bos_token_id": 200000,
        "eos_token_id": [200001, 200007, 200008],
        "for_llm_compressor": False,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "initializer_range": 0.02,
        "interleave_moe_layer_step": 1,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "max_position_embeddings": 10485760,
        "model_type": "llama4_text",
        "no_rope_layers": [],
        "num_attention_heads": 40,
        "num_experts_per_tok": 1,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 16,
        "output_router_logits": False,
        "pad_token_id": 200018,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 16.0,
            "high_freq_factor": 1.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_qk_norm": True,
        "vocab_size": 202048,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0.dev0",
    "vision_config": {"hidden_size": 1408, "model_type": "llama4_vision_model", "num_hidden_layers": 34},
}

QWEN3_NEXT_80B_A3B = {  # Qwen/Qwen3-Next-80B-A3B-Instruct config.json
    "architectures": ["Qwen3NextForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "full_attention_interval": 4,
    "head_dim": 256,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_value_head_dim": 128,
    "max_position_embeddings": 262144,
    "mlp_only_layers": [],
    "model_type": "qwen3_next",
    "moe_intermediate_size": 512,
    "norm_topk_prob": True,
    "num_attention_heads": 16,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "num_hidden_layers": 48,
    "num_key_value_heads": 2,
    "output_router_logits": False,
    "partial_rotary_factor": 0.25,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000000,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 512,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.0.dev0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

JAMBA_V01 = {  # ai21labs/Jamba-v0.1 config.json
    "architectures": ["JambaForCausalLM"],
    "attention_dropout": 0.0,
    "attn_layer_offset": 4,
    "attn_layer_period": 8,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "expert_layer_offset": 1,
    "expert_layer_period": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "mamba_conv_bias": True,
    "mamba_d_conv": 4,
    "mamba_d_state": 16,
    "mamba_dt_rank": 256,
    "mamba_expand": 2,
    "mamba_proj_bias": False,
    "max_position_embeddings": 262144,
    "model_type": "jamba",
    "num_attention_heads": 32,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_logits_to_keep": 1,
    "output_router_logits": False,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "use_mamba_kernels": True,
    "vocab_size": 65536,
}

GEMMA_2_9B_IT = {  # google/gemma-2-9b-it config.json (no layer_types: Gemma 2 alternates)
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 16,
    "num_hidden_layers": 42,
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "sliding_window_size": 4096,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.42.0.dev0",
    "use_cache": True,
    "vocab_size": 256000,
}

QWEN2_7B = {  # Qwen/Qwen2-7B config.json (the test switches use_sliding_window on)
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.37.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}


# -- helpers ----------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """sparsebench (test app)."""

    register(app)
    return app


def _kv(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(_app(), ["kv", *args], env=env)


def _config(tmp_path, config: dict, folder: str = "model") -> str:
    path = tmp_path / folder / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return str(path)


def _json(tmp_path, config: dict, *args: str) -> dict:
    res = _kv("--model-file", _config(tmp_path, config), "--context", "128k", "--dtype", "bf16", "--json", *args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _groups(row_or_doc: dict) -> list[tuple]:
    return [(g["type"], g["layers"], g["retained_tokens"], g["bytes"]) for g in row_or_doc["groups"]]


# -- the findings of the issue ---------------------------------------------------------------


def test_gpt_oss_120b_half_its_layers_are_full_attention(tmp_path):
    # bf16, per token and layer: 2 (K, V) x 8 KV heads x head_dim 64 x 2 bytes = 2048 bytes
    # 18 sliding layers keep 128 tokens: 18 x 128 x 2048     =     4_718_592
    # 18 full layers keep 131072:        18 x 131072 x 2048  = 4_831_838_208
    # total                                                   = 4_836_556_800
    doc = _json(tmp_path, GPT_OSS_120B)
    own = doc["rows"][0]
    assert own["pattern"] == "model default"
    assert own["bytes"] == 4_836_556_800  # was 9_437_184: the window on every layer
    assert doc["total_bytes"] == 4_836_556_800
    assert _groups(doc) == [
        ("sliding_attention", 18, 128, 4_718_592),
        ("full_attention", 18, N, 4_831_838_208),
    ]
    dense = doc["rows"][1]
    assert dense["pattern"] == "dense" and dense["bytes"] == 36 * N * 2048  # 9 GiB
    assert own["vs_dense"] == pytest.approx(4_836_556_800 / (36 * N * 2048))


def test_deepseek_v3_caches_an_mla_latent(tmp_path):
    # MLA: kv_lora_rank 512 + qk_rope_head_dim 64 = 576 values per token and layer, shared by
    # all 128 heads; bf16: 576 x 2 = 1152 bytes; 61 layers x 131072 tokens x 1152 = 9_210_691_584
    # (the MTP layer, num_nextn_predict_layers 1, is not counted)
    doc = _json(tmp_path, DEEPSEEK_V3)
    dense = doc["rows"][0]
    assert dense["pattern"] == "dense"  # every layer is full attention
    assert dense["bytes"] == 61 * N * 1152 == 9_210_691_584  # was 25x more: 128 heads of head_dim 56
    assert doc["groups"] == [
        {
            "type": "full_attention",
            "layers": 61,
            "cache": "latent",
            "pattern": "dense",
            "replaced": False,
            "retained_tokens": N,
            "bytes": 9_210_691_584,
            "counted": True,
        }
    ]
    assert doc["model"]["attention"] == "MLA" and doc["model"]["mla_latent"] == 576
    notes = " ".join(doc["notes"])
    assert "576 values per token" in notes and "shared by all 128 heads" in notes
    assert "1 multi-token-prediction layer(s) (num_nextn_predict_layers) not counted" in notes


def test_gemma_3_multimodal_config_reads_its_text_config(tmp_path):
    # text_config: 62 layers, no sliding_window_pattern in the file: transformers' default 6 for
    # gemma3_text, so layers 5, 11, ..., 59 (10 layers) are full, the other 52 slide over 1024;
    # explicit head_dim 128 (hidden_size / heads would be 168); per token and layer:
    # 2 x 16 KV heads x 128 x 2 bytes = 8192 bytes
    # sliding: 52 x 1024 x 8192   =    436_207_616
    # full:    10 x 131072 x 8192 = 10_737_418_240
    doc = _json(tmp_path, GEMMA_3_27B_IT)  # was refused: "missing field 'layers'"
    assert doc["model"]["head_dim"] == 128 and doc["model"]["layer_types"] == {
        "sliding_attention": 52,
        "full_attention": 10,
    }
    assert _groups(doc) == [("sliding_attention", 52, 1024, 436_207_616), ("full_attention", 10, N, 10_737_418_240)]
    assert doc["total_bytes"] == 11_173_625_856
    assert any("sliding_window_pattern 6" in n and "as transformers sets it for gemma3_text" in n for n in doc["notes"])


def test_llama_4_scout_chunked_layers(tmp_path):
    # no_rope_layers is empty: a NoPE layer every 4th (i = 3, 7, ..., 47: 12 full layers); the 36
    # RoPE layers attend inside chunks of 8192. Per token and layer: 2 x 8 x 128 x 2 = 4096 bytes
    # chunked: 36 x 8192 x 4096   = 1_207_959_552
    # full:    12 x 131072 x 4096 = 6_442_450_944
    doc = _json(tmp_path, LLAMA_4_SCOUT)
    assert _groups(doc) == [("chunked_attention", 36, 8192, 1_207_959_552), ("full_attention", 12, N, 6_442_450_944)]
    assert doc["total_bytes"] == 7_650_410_496
    assert doc["rows"][0]["groups"][0]["pattern"] == "block_local(block=8192)"
    # a chunk keeps at most what has been seen: at 1k every layer keeps 1024
    small = _kv("--model-file", _config(tmp_path, LLAMA_4_SCOUT), "--context", "1k", "--json")
    assert [g["retained_tokens"] for g in json.loads(small.stdout)["groups"]] == [1024, 1024]


def test_qwen3_next_counts_its_linear_attention_state_apart(tmp_path):
    # full_attention_interval 4: layers 3, 7, ..., 47 full (12), the other 36 gated delta net
    # full: 12 x 131072 x (2 x 2 KV heads x 256 x 2 bytes = 2048) = 3_221_225_472
    # state per linear layer (values): conv (4 - 1) x (2 x 16 x 128 + 32 x 128) = 3 x 8192 = 24_576
    #   recurrent 32 value heads x 128 x 128 = 524_288; 548_864 values x 2 bytes = 1_097_728
    # 36 layers x 1_097_728 = 39_518_208
    doc = _json(tmp_path, QWEN3_NEXT_80B_A3B)
    own = doc["rows"][0]
    assert own["bytes"] == 3_260_743_680  # was 48 full-attention layers: 6_442_450_944
    assert _groups(doc) == [("linear_attention", 36, None, 39_518_208), ("full_attention", 12, N, 3_221_225_472)]
    assert own["state_bytes"] == 39_518_208 and own["kv_bytes"] == 3_221_225_472
    assert doc["total_bytes"] == 3_260_743_680
    assert doc["groups"][0]["cache"] == "state"


def test_jamba_mamba_layers(tmp_path):
    # attn_layer_period 8, offset 4: attention at i = 4, 12, 20, 28 (4 layers), Mamba elsewhere (28)
    # attention: 4 x 131072 x (2 x 8 x (4096 / 32 = 128) x 2 = 4096) = 2_147_483_648
    # Mamba state: inner = expand 2 x hidden 4096 = 8192; conv (4 - 1) x 8192 = 24_576;
    #   ssm 8192 x d_state 16 = 131_072; 155_648 values x 2 bytes = 311_296; x 28 = 8_716_288
    doc = _json(tmp_path, JAMBA_V01)
    assert doc["rows"][0]["bytes"] == 2_156_199_936  # was 32 full-attention layers: 17_179_869_184
    assert _groups(doc) == [("mamba", 28, None, 8_716_288), ("full_attention", 4, N, 2_147_483_648)]
    assert doc["total_bytes"] == 2_156_199_936


def test_a_state_without_sizes_is_said_not_counted(tmp_path):
    config = {**QWEN3_NEXT_80B_A3B}
    for key in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"):
        del config[key]
    doc = _json(tmp_path, config)
    own = doc["rows"][0]
    assert own["bytes"] == 3_221_225_472  # the 12 full layers; the state is not counted as zero bytes
    assert own["groups"][0] == {
        "type": "linear_attention",
        "layers": 36,
        "cache": "state",
        "pattern": "fixed state",
        "replaced": False,
        "retained_tokens": None,
        "bytes": None,
        "counted": False,
    }
    assert own["uncounted_state_layers"] == 36 and own["bytes"] == 3_221_225_472
    assert any("state not counted" in n for n in doc["notes"])
    table = _kv("--model-file", _config(tmp_path, config), "--context", "128k", env={"COLUMNS": "80"})
    assert "not counted" in table.stdout


def test_gemma_2_alternates_and_qwen2_slides_from_max_window_layers(tmp_path):
    # Gemma 2: layer i slides when (i + 1) % 2 != 0: 21 sliding (4096), 21 full; at its 8192:
    # per token and layer 2 x 8 x 256 x 2 = 8192 bytes; 21 x 4096 x 8192 + 21 x 8192 x 8192
    res = _kv("--model-file", _config(tmp_path, GEMMA_2_9B_IT), "--context", "8k", "--dtype", "bf16", "--json")
    doc = json.loads(res.stdout)
    assert doc["rows"][0]["bytes"] == 2_113_929_216  # was 42 sliding layers: 1_409_286_144
    assert _groups(doc) == [("sliding_attention", 21, 4096, 704_643_072), ("full_attention", 21, 8192, 1_409_286_144)]
    # Qwen2 with use_sliding_window on: layers i >= max_window_layers (20) slide over 4096
    # per token 2 x 4 x 128 x 2 = 2048; full 20 x 32768 x 2048 + sliding 8 x 4096 x 2048
    config = {**QWEN2_7B, "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 20}
    res = _kv("--model-file", _config(tmp_path, config, "q"), "--context", "32k", "--dtype", "bf16", "--json")
    doc = json.loads(res.stdout)
    assert doc["rows"][0]["bytes"] == 1_409_286_144  # was 28 sliding layers: 234_881_024
    assert _groups(doc) == [("full_attention", 20, 32768, 1_342_177_280), ("sliding_attention", 8, 4096, 67_108_864)]
    # as published (use_sliding_window false) every layer is full attention, sliding_window unused
    res = _kv("--model-file", _config(tmp_path, QWEN2_7B, "q2"), "--context", "32k", "--json")
    assert json.loads(res.stdout)["rows"][0]["bytes"] == 28 * 32768 * 2048
    assert _groups(json.loads(res.stdout)) == [("full_attention", 28, 32768, 28 * 32768 * 2048)]


def test_a_pattern_replaces_the_full_attention_layers_of_a_mixed_model(tmp_path):
    # gpt-oss-120b with sliding_window(4096): the 18 full layers keep 4096, the 18 sliding keep 128
    # 18 x 4096 x 2048 = 150_994_944; 18 x 128 x 2048 = 4_718_592
    doc = _json(tmp_path, GPT_OSS_120B, "--pattern", "sliding_window", "-p", "window=4096")
    row = doc["rows"][-1]
    assert row["pattern"] == "sliding_window"
    assert row["bytes"] == 155_713_536  # was 301_989_888: the pattern on every layer
    assert [(g["type"], g["replaced"], g["retained_tokens"]) for g in row["groups"]] == [
        ("sliding_attention", False, 128),
        ("full_attention", True, 4096),
    ]
    assert any("replaces the attention of the 18 full-attention layers only" in n for n in doc["notes"])


def test_budget_and_pages_use_the_per_layer_accounting(tmp_path):
    # gpt-oss-120b, context 1000, pages of 96: a full layer keeps 1000 -> 11 pages = 1056 tokens,
    # a sliding layer 128 -> 2 pages = 192; 18 x 1056 x 2048 + 18 x 192 x 2048 = 46_006_272
    # budget 1 GiB: max batch 1_073_741_824 // 46_006_272 = 23
    # max context at batch 1: 18 x 2048 x P + 18 x 192 x 2048 <= 2**30 with P a multiple of 96:
    #   36_864 x P <= 1_066_663_936 -> P <= 28_935.3 -> P = 301 x 96 = 28_896
    path = _config(tmp_path, GPT_OSS_120B)
    res = _kv(
        "--model-file", path, "--context", "1000", "--page", "96", "--budget", "1GiB", "--dtype", "bf16", "--json"
    )
    own = json.loads(res.stdout)["rows"][0]
    assert own["bytes"] == 46_006_272  # was 36 layers of 192 tokens: 14_155_776
    assert own["max_batch"] == 23 and own["max_context"] == 28_896
    assert [g["retained_tokens"] for g in own["groups"]] == [192, 1056]


def test_table_breaks_the_total_down_by_group_within_80_columns(tmp_path):
    path = _config(tmp_path, GPT_OSS_120B)
    res = _kv("--model-file", path, "--context", "128k", "--dtype", "bf16", "--budget", "24GiB", env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    # each group on one line: its label, tokens (as the rows write them: 128k) and bytes
    assert any(line.split() == ["18", "sliding", "128", "4.50", "MiB"] for line in lines), res.stdout
    assert any(line.split() == ["18", "full", "128k", "4.50", "GiB"] for line in lines), res.stdout
    assert any(line.split() == ["18", "replaced", "4k", "144.00", "MiB"] for line in lines), res.stdout
    assert "18 full-attention layers only" in " ".join(lines)


# -- presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, config",
    [
        ("gpt-oss-120b", GPT_OSS_120B),
        ("deepseek-v3", DEEPSEEK_V3),
        ("gemma-3-27b", GEMMA_3_27B_IT),
        ("llama-4-scout", LLAMA_4_SCOUT),
        ("qwen3-next-80b-a3b", QWEN3_NEXT_80B_A3B),
        ("jamba-v0.1", JAMBA_V01),
    ],
)
def test_presets_are_their_published_configs(tmp_path, preset, config):
    spec = kvcache.load_preset(preset)
    assert spec.source.startswith("https://huggingface.co/") and spec.source.endswith("/config.json")
    from_file = kvcache.load_model_file(_config(tmp_path, config))
    assert dataclasses.replace(from_file, name=preset) == spec


def test_gpt_oss_20b_preset():
    spec = kvcache.load_preset("gpt-oss-20b")
    # 12 full layers x 131072 x 2048 + 12 sliding x 128 x 2048
    assert kvcache.kv_bytes(spec, None, N, dtype="bf16") == 12 * N * 2048 + 12 * 128 * 2048
    assert spec.counts() == {"sliding_attention": 12, "full_attention": 12}


def test_every_preset_cites_its_config():
    for name in kvcache.PRESETS:
        assert kvcache.load_preset(name).source.startswith("https://huggingface.co/"), name


# -- bad input ---------------------------------------------------------------------------------


def _fails(res, *parts: str) -> None:
    assert res.exit_code == 2, res.output
    assert res.stdout == ""  # nothing computed
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in res.output
    for part in parts:
        assert part in line, line


def test_unknown_model_lists_the_presets():
    res = _kv("--model", "gpt-oss", "--context", "1k")
    _fails(res, "unknown model preset 'gpt-oss'", "gpt-oss-120b", "deepseek-v3", "qwen3-next-80b-a3b")


def test_config_that_is_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"num_hidden_layers": 36,\n "num_attention_heads": 64,}\n')
    _fails(_kv("--model-file", str(path), "--context", "1k"), f"{path}: not valid JSON at line 2")


@pytest.mark.parametrize(
    "config, key",
    [
        ({k: v for k, v in GPT_OSS_120B.items() if k != "num_attention_heads"}, "missing key 'num_attention_heads'"),
        (
            {
                **GEMMA_3_27B_IT,
                "text_config": {k: v for k, v in GEMMA_3_27B_IT["text_config"].items() if k != "num_hidden_layers"},
            },
            "missing key 'text_config.num_hidden_layers'",
        ),
        ({k: v for k, v in DEEPSEEK_V3.items() if k != "qk_rope_head_dim"}, "missing key 'qk_rope_head_dim'"),
        ({k: v for k, v in GPT_OSS_120B.items() if k != "sliding_window"}, "missing key 'sliding_window'"),
        ({k: v for k, v in JAMBA_V01.items() if k != "attn_layer_offset"}, "missing key 'attn_layer_offset'"),
        ({**QWEN3_NEXT_80B_A3B, "linear_value_head_dim": None}, "missing key 'linear_value_head_dim'"),
        ({**GPT_OSS_120B, "layer_types": ["sliding_attention"] * 35}, "key 'layer_types' lists 35 layers"),
        ({**GPT_OSS_120B, "num_key_value_heads": "eight"}, "key 'num_key_value_heads' must be a positive integer"),
    ],
)
def test_config_missing_or_bad_key_names_file_and_key(tmp_path, config, key):
    path = _config(tmp_path, config)
    _fails(_kv("--model-file", path, "--context", "1k"), path, key)


def test_config_with_an_unknown_attention_type(tmp_path):
    config = {**GPT_OSS_120B, "layer_types": ["sliding_attention", "cross_attention"] * 18}
    path = _config(tmp_path, config)
    _fails(
        _kv("--model-file", path, "--context", "1k"),
        path,
        "key 'layer_types'",
        "unknown attention type 'cross_attention'",
    )
