"""Qwen3, Gemma 2, Gemma 3 and Mistral's sliding window against transformers.

Each family is a tiny random transformers model built locally (float32), saved with
save_pretrained and imported. The configs are chosen so every feature changes the numbers:
head_dim decoupled from D / N, q/k norms, (1 + w) and sandwich norms (all weights perturbed
away from HF's init), GeGLU, soft-caps small enough to bend the logits, a query_pre_attn_scalar
that is not H, and a sliding window of 5 inside sequences of 16 (prompts of 6 plus 10 generated
tokens, so the decode path runs past the window). Checks per family: logits on one device,
greedy generation token for token, and on an 8-device mesh with scanned layers (local and global
layers in one scan) the logits, then export -> transformers -> the same logits; the convert CLI
keeps every flag through a workdir.
"""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_parity  # noqa: E402  (tests/ is on sys.path; needs torch)

from rlhf_jax.infra import checkpoint, sharding  # noqa: E402
from rlhf_jax.models import config as model_config  # noqa: E402
from rlhf_jax.models import hf, hf_map  # noqa: E402
from rlhf_jax.tools import convert  # noqa: E402

V, D, T, WINDOW = 256, 64, 16, 5
RULES = sharding.DEFAULT_RULES
KINDS = ["qwen3", "gemma2", "gemma3", "mistral"]


def _hf_model(kind: str):
    """A tiny randomly initialised transformers model of `kind`, in eval mode."""
    t = transformers
    common = dict(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if kind == "qwen3":  # q/k norms, head_dim 32 != D / N = 16, untied
        model = t.Qwen3ForCausalLM(
            t.Qwen3Config(num_hidden_layers=2, head_dim=32, tie_word_embeddings=False, **common)
        )
    elif kind == "mistral":
        model = t.MistralForCausalLM(
            t.MistralConfig(num_hidden_layers=2, head_dim=16, sliding_window=WINDOW, **common)
        )
    elif kind == "gemma2":  # local, global, local; soft-caps that bend the logits
        cfg = t.Gemma2Config(
            num_hidden_layers=3,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=4.0,
            **common,
        )
        model = t.Gemma2ForCausalLM(cfg)
    elif kind == "gemma3":  # 2 local : 1 global, local RoPE base 10k, global 1M, q/k norms
        rope = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        }
        cfg = t.Gemma3TextConfig(
            num_hidden_layers=3,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters=rope,
            **common,
        )
        model = t.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    return hf_parity.perturbed(model)


hf_dirs = hf_parity.dirs_fixture(_hf_model)
_mesh, _logits, _hf_logits = hf_parity.mesh, hf_parity.logits, hf_parity.hf_logits


def _tokens(seed=0, shape=(2, T)):
    return hf_parity.tokens(V, shape, seed)


@pytest.mark.parametrize("kind", KINDS)
def test_import_maps_the_features(hf_dirs, kind):
    """The imported config holds each feature (so the parity tests below exercise it)."""
    cfg = hf_map.config_from_hf(hf.read_config(hf_dirs(kind)[0]))
    want = {
        "qwen3": dict(qk_norm=True, head_dim=32, sliding_window=0, tie_embeddings=False),
        "mistral": dict(sliding_window=WINDOW, window_pattern="", mlp_kind="swiglu"),
        "gemma2": dict(
            sliding_window=WINDOW,
            window_pattern="LG",
            query_pre_attn_scalar=24,
            attn_softcap=1.5,
            final_softcap=4.0,
            norm_plus_one=True,
            sandwich_norms=True,
            mlp="geglu",
            embed_scale=True,
            tie_embeddings=True,
        ),
        "gemma3": dict(
            window_pattern="LLG",
            rope_theta=1e6,
            rope_local_theta=1e4,
            qk_norm=True,
            query_pre_attn_scalar=0,
            final_softcap=0.0,
        ),
    }[kind]
    assert {k: getattr(cfg, k) for k in want} == want
    assert hf_map.config_from_hf(hf_map.config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(hf_dirs, kind):
    path, model = hf_dirs(kind)
    cfg, params = hf.import_hf(path, _mesh(1), RULES)
    tokens = _tokens()
    np.testing.assert_allclose(_logits(cfg, params, tokens), _hf_logits(model, tokens), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_transformers_past_the_window(hf_dirs, kind):
    path, model = hf_dirs(kind)
    cfg, params = hf.import_hf(path, _mesh(1), RULES)
    # T - 6 new tokens: the last steps attend keys the window has left behind
    ours, theirs = hf_parity.greedy_both(model, cfg, params, _tokens(seed=1, shape=(2, 6)), T - 6)
    assert theirs.shape == (2, T)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_eight_devices_scanned_then_export_reloads(hf_dirs, kind, tmp_path):
    path, model = hf_dirs(kind)
    cfg, params = hf.import_hf(path, _mesh(8), RULES, scan_layers=True)  # stacked + sharded
    tokens = _tokens(seed=2, shape=(8, T))
    want = _hf_logits(model, tokens)
    np.testing.assert_allclose(_logits(cfg, params, tokens, _mesh(8)), want, atol=1e-4)
    reloaded = hf_parity.export_and_reload(params, cfg, str(tmp_path), model)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens), want, atol=1e-5, rtol=0)


def test_cli_import_then_export_keeps_every_flag(hf_dirs, tmp_path):
    """The workdir's meta carries the Gemma flags (what init_from=WORKDIR builds), and the
    exported directory is the same model to transformers."""
    path, model = hf_dirs("gemma2")
    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    convert.main(["import", "--hf", path, "--out", work])
    cfg = model_config.ModelConfig(**checkpoint.read_meta(work)["model"])
    assert cfg == hf_map.config_from_hf(hf.read_config(path))
    convert.main(["export", "--checkpoint", work, "--out", out])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = _tokens(seed=3)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model, tokens), atol=1e-5)


def test_window_and_caps_change_the_logits(hf_dirs):
    """Without its window or soft-caps the Gemma 2 import would not match (the parity tests
    would catch their absence)."""
    path, model = hf_dirs("gemma2")
    cfg, params = hf.import_hf(path, _mesh(1), RULES)
    tokens = _tokens()
    want = _hf_logits(model, tokens)
    for change in (dict(sliding_window=0), dict(attn_softcap=0.0), dict(final_softcap=0.0)):
        other = _logits(dataclasses.replace(cfg, **change), params, tokens)
        assert np.abs(other - want).max() > 1e-2, change


# Abridged config.json files of published checkpoints, in the transformers 4.x format.
GEMMA2_2B = dict(
    model_type="gemma2",
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
    vocab_size=256000,
)
GEMMA3_1B = dict(
    model_type="gemma3_text",
    hidden_size=1152,
    intermediate_size=6912,
    num_hidden_layers=26,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_local_base_freq=10000.0,
    rope_scaling=None,
    query_pre_attn_scalar=256,
    sliding_window=512,
    sliding_window_pattern=6,
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
    vocab_size=262144,
)
QWEN3_06B = dict(
    model_type="qwen3",
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    sliding_window=None,
    use_sliding_window=False,
    max_window_layers=28,
    tie_word_embeddings=True,
    vocab_size=151936,
)
MISTRAL_V01 = dict(
    model_type="mistral",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    sliding_window=4096,
    vocab_size=32000,
)


@pytest.mark.parametrize(
    "hf_cfg, want",
    [
        (
            GEMMA2_2B,
            dict(window_pattern="LG", sliding_window=4096, final_softcap=30.0, attn_softcap=50.0),
        ),
        (
            GEMMA3_1B,
            dict(window_pattern="LLLLLG", sliding_window=512, rope_local_theta=1e4, n_kv_heads=1),
        ),
        (QWEN3_06B, dict(qk_norm=True, head_dim=128, sliding_window=0, tie_embeddings=True)),
        (MISTRAL_V01, dict(sliding_window=4096, window_pattern="", qk_norm=False)),
    ],
    ids=["gemma2-2b", "gemma3-1b", "qwen3-0.6b", "mistral-7b-v0.1"],
)
def test_published_configs_map_and_round_trip(hf_cfg, want):
    cfg = hf_map.config_from_hf(hf_cfg)
    assert {k: getattr(cfg, k) for k in want} == want
    assert hf_map.config_from_hf(hf_map.config_to_hf(cfg)) == cfg
    if hf_cfg is GEMMA3_1B:  # layer 6k + 5 is global; 26 layers end on two local ones
        assert cfg.layer_kinds()[4:7] == (True, False, True) and cfg.layer_kinds()[-2:] == (
            True,
            True,
        )


def test_refusals_are_one_line():
    with pytest.raises(ValueError, match="Gemma3ForConditionalGeneration"):
        hf_map.config_from_hf({"model_type": "gemma3", "text_config": GEMMA3_1B})
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        hf_map.config_from_hf({**GEMMA3_1B, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="hidden activation 'gelu' is not supported"):
        hf_map.config_from_hf({**GEMMA2_2B, "hidden_activation": "gelu"})
    mistral = hf_map.config_from_hf(MISTRAL_V01)
    with pytest.raises(ValueError, match="every layer"):
        hf_map.config_to_hf(dataclasses.replace(mistral, window_pattern="LG"))
    with pytest.raises(ValueError, match="no final_softcap"):
        hf_map.config_to_hf(dataclasses.replace(mistral, final_softcap=30.0))
