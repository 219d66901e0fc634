"""LoRA adapters in PEFT's layout (models/hf_peft.py, `convert export --adapters-only`): PEFT
loads them onto the Hugging Face base and computes our LoRA model's logits, GPT-2's fused c_attn
and a scanned LLaMA included; a LoRA SFT run from a tiny Qwen3 (`init_from=hf:DIR`) exports its
adapters for `peft.PeftModel` and its merged weights for transformers, both with our logits."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import hf_tokenizers  # noqa: E402  (tests/ is on sys.path)
from test_lora import ALL, forward, pure  # noqa: E402

from experiments import sft  # noqa: E402
from rlhf_jax.infra import mesh as mesh_lib  # noqa: E402
from rlhf_jax.models import config as model_config  # noqa: E402
from rlhf_jax.models import hf, hf_peft, lora  # noqa: E402
from rlhf_jax.models import transformer as M  # noqa: E402
from rlhf_jax.stages import lm, setup  # noqa: E402
from rlhf_jax.tools import convert  # noqa: E402

CASES = {  # GPT-2: c_attn holds q and v but not k, and c_proj is adapted in attn, not mlp
    "gpt2": dict(family="gpt2", lora_targets="q,v,o,up"),
    "llama": dict(family="llama", scan_layers=True, lora_targets=ALL + ",embed,head"),
}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def load_peft(base_dir, adapter_dir):
    """transformers' base model with PEFT's adapters from `adapter_dir`; every saved key used."""
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with open(os.path.join(adapter_dir, hf_peft.WEIGHTS_FILE), "rb") as f:
        saved = set(json.loads(f.read(int.from_bytes(f.read(8), "little")))) - {"__metadata__"}
    wanted = {k for k in peft.get_peft_model_state_dict(model) if "lora_" in k}
    assert saved == wanted
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_computes_our_lora_model_on_the_exported_base(tmp_path, case):
    cfg = model_config.preset("tiny", dtype="float32", lora_rank=4, lora_alpha=6.0, **CASES[case])
    params = pure(M.build(cfg, seed=0))
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(  # B away from 0, so every adapter matters
        lambda p, x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype)
        if str(p[-1].key) == "b" else x,
        params,
    )  # fmt: skip
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapters")
    hf.export_hf(lora.split_adapters(params)[1], lora.base_config(cfg), base_dir)
    hf_peft.export_adapters(params, cfg, adapter_dir, base=base_dir)
    config = read_json(os.path.join(adapter_dir, hf_peft.CONFIG_FILE))
    if case == "gpt2":
        assert config["target_modules"] == ["attn.c_proj", "c_attn", "c_fc"]
        assert config["rank_pattern"] == {"c_attn": 8} and config["alpha_pattern"] == {"c_attn": 12}
    else:
        assert config["target_modules"] == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]
            + ["embed_tokens", "lm_head"]
        )
    assert config["base_model_name_or_path"] == base_dir and config["lora_alpha"] == 6

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    ours = forward(cfg, params, jnp.asarray(tokens))
    base = forward(lora.base_config(cfg), lora.split_adapters(params)[1], jnp.asarray(tokens))
    assert np.abs(ours - base).max() > 1e-2  # the adapters matter
    theirs = hf_logits(load_peft(base_dir, adapter_dir), tokens)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


def test_what_peft_cannot_hold_is_one_sentence():
    tied = model_config.preset("tiny", lora_rank=4, lora_targets="q,embed")  # GPT-2: tied head
    with pytest.raises(ValueError, match=r"embedding adapter \(its head is the embedding\)"):
        hf_peft.check(tied)
    rm = model_config.preset("tiny", lora_rank=4, lora_targets="q", head="scalar")
    with pytest.raises(ValueError, match="scalar head.*export it merged"):
        hf_peft.check(rm)
    with pytest.raises(ValueError, match=r"no LoRA adapters \(lora.rank 0\)"):
        hf_peft.check(model_config.preset("tiny"))


def hf_qwen3(directory: str) -> str:
    """A tiny random untied Qwen3ForCausalLM (q/k norms, GQA) and a Qwen tokenizer."""
    hf_tokenizers.qwen(directory)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    cfg = transformers.Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,  # so the embedding and the head both get adapters
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.mark.slow
def test_lora_sft_from_hf_exports_adapters_for_peft_and_merged_for_transformers(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_dir = hf_qwen3(str(tmp_path / "qwen3"))
    c = sft.get_config()
    c.init_from = f"hf:{hf_dir}"
    c.lora.update(rank=4, alpha=8.0, targets=ALL + ",embed,head")
    c.sft.eval_samples = 0
    c.train.update(epochs=0.0, steps=3, batch_size=8, seq_len=128, lr=3e-2, warmup_steps=0,
                   log_every=1, ckpt_every=3, eval_every=0)  # fmt: skip
    mesh = mesh_lib.build_mesh(c.mesh, jax.devices())
    work = str(tmp_path / "sft")
    state = lm.run(c, mesh, work)
    tok = setup.load_tokenizer(c, work)
    lora_cfg = setup.resolve_model(c, tok)[0]
    tokens = np.random.default_rng(0).integers(0, lora_cfg.vocab_size, (2, 10)).astype(np.int32)
    ours = forward(lora_cfg, state["params"], jnp.asarray(tokens))

    out = str(tmp_path / "adapters")
    files = convert.main(["export", "--checkpoint", work, "--out", out, "--adapters-only"])
    assert sorted(os.path.basename(f) for f in files) == [hf_peft.CONFIG_FILE, hf_peft.WEIGHTS_FILE]
    config = read_json(os.path.join(out, hf_peft.CONFIG_FILE))
    assert config["base_model_name_or_path"] == hf_dir and config["r"] == 4
    source = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert np.abs(hf_logits(source, tokens) - ours).max() > 1e-3  # SFT moved the model
    np.testing.assert_allclose(hf_logits(load_peft(hf_dir, out), tokens), ours, atol=1e-4)

    merged = str(tmp_path / "merged")
    convert.main(["export", "--checkpoint", work, "--out", merged])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), ours, atol=1e-4)
