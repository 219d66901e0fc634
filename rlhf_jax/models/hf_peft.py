"""LoRA adapters alone in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

What `peft.PeftModel.from_pretrained(base, DIR)` loads onto the Hugging Face model of the
adapters' base (hf.py exports that base; hf_map.py names its tensors). Ours and PEFT's, per
adapted weight W (ours [*in, *out], models/lora.py):
  ours  A [*in, r], B [r, *out]                 x W + (x A) B * alpha / r
  PEFT  lora_A.weight [r, in], lora_B.weight [out, r]  (nn.Linear weights: A^T, B^T flattened)
        embedding: lora_embedding_A [r, V] = A^T, lora_embedding_B [D, r] = B^T
The scale is PEFT's lora_alpha / r, the same. Keys are `base_model.model.<HF module>.lora_A.weight`
where <HF module> is the HF tensor's name without `.weight` (the base-model prefix included).

GPT-2's c_attn is one HF module holding q, k and v (hf_map's fused tensor) while ours has an
adapter per projection: the PEFT adapter of c_attn stacks them, rank n * r for the n adapted of
q/k/v, A = [A_q; A_k; A_v]^T and a block-diagonal B (a projection without an adapter gets zero
rows), so x A B is each projection's update in its own columns; `rank_pattern` and
`alpha_pattern` give c_attn rank n * r and alpha n * alpha, keeping the scale alpha / r.

Not expressible in PEFT, refused in one sentence: an embedding adapter with a tied head (ours
unembeds with the adapted matrix; PEFT's embedding adapter does not reach the head) or with
Gemma's sqrt(D) embedding scale (ours scales the update, PEFT adds it after the scale), and a
scalar (reward / value) head. Export such a workdir merged instead.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from safetensors.numpy import save_file

from rlhf_jax.models import hf, hf_map, lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def check(cfg) -> None:
    """Refuses, in one sentence, adapters that PEFT's LoRA cannot express (module docstring)."""
    fix = "export it merged (without --adapters-only)"
    if not cfg.lora_rank:
        raise ValueError(f"the model has no LoRA adapters (lora.rank 0): {fix}")
    if cfg.head == "scalar":
        raise ValueError(f"a reward or value model (scalar head) has no PEFT LM layout: {fix}")
    if cfg.lora_on("embed") and (cfg.tie_embeddings or cfg.embed_scale):
        why = "its head is the embedding" if cfg.tie_embeddings else "it scales the embedding"
        raise ValueError(f"PEFT cannot hold this model's embedding adapter ({why}): {fix}")


def _adapter_path(path: tuple) -> tuple:
    """Our param path of the adapter of param `path` (("blocks", 0, "attn", "q_lora"))."""
    return (*path[:-1], f"{path[-1]}{lora.SUFFIX}")


def _has(params, path: tuple) -> bool:
    node = params
    for k in path[:1] + path[2:] if path[0] == "layers" else path:  # stacked: ("layers", i, ...)
        if k not in node:
            return False
        node = node[k]
    return True


def _modules(cfg, params):
    """[(HF module name with the base-model prefix, hf_map Tensor, our adapted param paths)]."""
    prefix = "transformer." if cfg.family == "gpt2" else "model."
    out = []
    for t in hf_map.tensor_map(cfg):
        adapted = [p for p in t.targets if _has(params, _adapter_path(p))]
        if adapted:
            name = t.name[1:] if t.name.startswith("/") else prefix + t.name
            out.append((name.removesuffix(".weight"), t, adapted))
    return out


def _short_names(modules, cfg) -> dict[str, str]:
    """Module name -> the shortest dotted suffix that matches adapted modules only (PEFT matches
    `target_modules` as suffixes): `q_proj`, but GPT-2's `attn.c_proj` where `mlp.c_proj` is
    not adapted."""
    every = [t.name.lstrip("/").removesuffix(".weight") for t in hf_map.tensor_map(cfg)]
    adapted = {m for m, _, _ in modules}
    out = {}
    for m, _, _ in modules:
        parts = m.split(".")
        for n in range(1, len(parts) + 1):
            s = ".".join(parts[-n:])
            hits = [e for e in every if e == s or e.endswith("." + s)]
            if all(any(a == h or a.endswith("." + h) for a in adapted) for h in hits):
                out[m] = s
                break
    return out


def tensors(cfg, params) -> dict[str, np.ndarray]:
    """PEFT's tensors of a LoRA model's adapters.

    Args:
      cfg: the LoRA model's config.
      params: a params tree holding its adapters (sharded or host arrays; heads and base
        leaves may be present or not). Every process must call this (gathers are collective).

    Returns:
      {PEFT key: host array}, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    """
    check(cfg)
    r = cfg.lora_rank
    out = {}

    def get(path, leaf):  # [*in, r] -> [in, r]; [r, *out] -> [r, out]
        x = hf._host(params, (*_adapter_path(path), leaf))
        return x.reshape(-1, r) if leaf == "a" else x.reshape(r, -1)

    for name, t, adapted in _modules(cfg, params):
        key = KEY_PREFIX + name
        if t.targets == (("embed",),):
            out[f"{key}.lora_embedding_A"] = get(t.targets[0], "a").T  # [r, V]
            out[f"{key}.lora_embedding_B"] = get(t.targets[0], "b").T  # [D, r]
            continue
        if len(t.targets) == 1:
            out[f"{key}.lora_A.weight"] = get(t.targets[0], "a").T  # [r, in]
            out[f"{key}.lora_B.weight"] = get(t.targets[0], "b").T  # [out, r]
            continue
        # A fused module (GPT-2's c_attn): its parts' outputs side by side, each adapter its own
        # r columns of the stacked rank.
        widths = [t.shape[-1] // len(t.targets)] * len(t.targets)
        a = np.concatenate([get(p, "a") for p in adapted], axis=1)  # [in, n r]
        b = np.zeros((len(adapted) * r, sum(widths)), a.dtype)  # [n r, out]
        for j, p in enumerate(adapted):
            col = sum(widths[: t.targets.index(p)])
            b[j * r : (j + 1) * r, col : col + widths[t.targets.index(p)]] = get(p, "b")
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = a.T, b.T
    return out


def adapter_config(cfg, params, base: str) -> dict:
    """PEFT's `adapter_config.json` of a LoRA model's adapters on the HF model `base`."""
    check(cfg)
    modules = _modules(cfg, params)
    short = _short_names(modules, cfg)
    # A fused module's rank is its adapted parts' ranks together.
    ranks = {short[m]: len(ad) * cfg.lora_rank for m, t, ad in modules if len(t.targets) > 1}
    alpha = cfg.lora_alpha
    as_json = lambda x: int(x) if float(x).is_integer() else float(x)  # noqa: E731
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": cfg.lora_rank,
        "lora_alpha": as_json(alpha),
        "target_modules": sorted(set(short.values())),
        "rank_pattern": ranks,
        "alpha_pattern": {k: as_json(alpha * (n // cfg.lora_rank)) for k, n in ranks.items()},
        "fan_in_fan_out": cfg.family == "gpt2",  # GPT-2's Conv1D stores W as [in, out]
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def export_adapters(params, cfg, out_dir: str, *, base: str, dtype: str | None = None):
    """Writes `adapter_config.json` and `adapter_model.safetensors` of a LoRA model's adapters.

    Args:
      params: a params tree holding the adapters (`restore.restore_trainable`'s).
      cfg: the LoRA model's config.
      out_dir: the directory to write (created).
      base: `base_model_name_or_path`, the HF model the adapters sit on (or a note saying what
        it is when it is no HF directory).
      dtype: float32, bfloat16 or float16; default the adapters' own.

    Returns:
      The files written (on process 0; [] elsewhere). Every process must call this.
    """
    weights = tensors(cfg, params)
    if dtype is not None:
        if dtype not in hf._DTYPES:
            raise ValueError(f"unknown export dtype: {dtype!r}; expected one of {list(hf._DTYPES)}")
        weights = {k: v.astype(hf._DTYPES[dtype]) for k, v in weights.items()}
    config = adapter_config(cfg, params, base)
    if jax.process_index() != 0:
        return []
    os.makedirs(out_dir, exist_ok=True)
    file = os.path.join(out_dir, WEIGHTS_FILE)
    weights = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    save_file(weights, file + ".tmp", metadata={"format": "pt"})  # PEFT reads "pt" files
    os.replace(file + ".tmp", file)
    return [file, hf._write_json(os.path.join(out_dir, CONFIG_FILE), config)]
