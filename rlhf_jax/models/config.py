"""The model config and the named sizes: `ModelConfig`, its derived defaults, and `preset`.

This module owns the architecture and numerics fields every other module reads (`cfg.d_model`,
`cfg.family`, ...), their validation and derivation (`__post_init__`), and the size presets
tiny..175b. It is plain Python (no jax, no NNX), so checkpoint metas, the HF mapping and the
config layer can build and compare configs without touching a model; transformer.py builds the
model a config describes.

Families are the two decoder skeletons: `gpt2` (learned positions, LayerNorm, GELU MLP, biases)
and `llama` (RoPE, RMSNorm, gated MLP). Qwen3, Gemma 2 and Gemma 3 are the llama family plus
flags, not families of their own: each flag is one piece of math (q/k norm, (1 + w) norms,
sandwich norms, GeGLU, embedding scale, soft-capping, query scaling, sliding windows), so a
researcher can mix them, and `VARIANTS` names the flag sets of the published architectures
(hf_map maps a Hugging Face `model_type` to and from them). Per-layer attention kinds
(`window_pattern`) are a string, so configs stay hashable and JSON-friendly; `layer_kinds`
expands it to one entry per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

FAMILIES = ("gpt2", "llama")
MLPS = ("gelu", "swiglu", "geglu")
# The projections a LoRA adapter may sit on: attention q/k/v/o, the MLP's up/gate/down (gate only
# in a gated MLP), the embedding lookup and the unembedding ("head", an untied LM head only).
LORA_TARGETS = ("q", "k", "v", "o", "up", "gate", "down", "embed", "head")
LORA_DEFAULT_TARGETS = "q,k,v,o,up,gate,down"
# The ModelConfig fields `config.lora` sets (not `config.model` keys).
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_base_dtype")

# The flags each published llama-family architecture fixes (`dataclasses.replace(cfg, **v)`);
# sizes, windows, soft-caps, query scaling and RoPE bases vary per checkpoint.
VARIANTS: dict[str, dict] = {
    "llama": {},  # also Mistral: the same math plus an optional sliding window on every layer
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
    "gemma2": dict(norm_plus_one=True, sandwich_norms=True, mlp="geglu", embed_scale=True),
    "gemma3": dict(
        norm_plus_one=True, sandwich_norms=True, mlp="geglu", embed_scale=True, qk_norm=True
    ),
}


def target_list(targets: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in targets.split(",") if t.strip())


def check_lora(rank: int, alpha: float, targets: str, base_dtype: str) -> None:
    """One sentence on a bad `config.lora` (the entry checks it before any stage starts)."""
    if rank < 0:
        raise ValueError(f"lora.rank={rank} must be >= 0 (0 turns LoRA off)")
    if rank == 0:
        return
    unknown = [t for t in target_list(targets) if t not in LORA_TARGETS]
    if unknown or not target_list(targets):
        raise ValueError(
            f"unknown lora.targets entry {(unknown or [''])[0]!r} in {targets!r}; "
            f"expected a comma-separated subset of {','.join(LORA_TARGETS)}"
        )
    if base_dtype not in ("", "float32", "bfloat16"):
        raise ValueError(f"unknown lora.base_dtype: {base_dtype!r}; expected float32 or bfloat16")
    if alpha <= 0:
        raise ValueError(f"lora.alpha={alpha} must be > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics. Zero-valued sizes are derived in `__post_init__`."""

    family: str = "gpt2"  # gpt2: learned pos, LayerNorm, GELU, tied, biases; llama: RoPE...
    vocab_size: int = 50304
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 0  # 0 -> n_heads (no grouping)
    head_dim: int = 0  # 0 -> d_model // n_heads
    d_ff: int = 0  # 0 -> 4 D (gpt2) or the LLaMA 8/3 D rule rounded to 256
    max_len: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | linear | llama3 (as Hugging Face configs name them)
    rope_factor: float = 1.0  # linear / llama3: how much longer the context got
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: the pre-extension context length
    rope_local_theta: float = 0.0  # > 0: local layers' RoPE base, unscaled (Gemma 3: 10k)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2-style llama family)
    qk_norm: bool = False  # RMSNorm over each head's q and k [H] before RoPE (Qwen3, Gemma 3)
    norm_eps: float = 1e-5
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), w zero-initialised (Gemma)
    sandwich_norms: bool = False  # also norm the attention and MLP outputs (Gemma 2/3)
    mlp: str = ""  # gelu | swiglu | geglu (gelu-tanh gated); "" -> gelu (gpt2), swiglu (llama)
    embed_scale: bool = False  # embeddings times sqrt(D) in the compute dtype (Gemma)
    query_pre_attn_scalar: int = 0  # > 0: logits scaled by its -1/2 power, not H's (Gemma)
    attn_softcap: float = 0.0  # > 0: attention logits become c * tanh(logits / c) (Gemma 2)
    final_softcap: float = 0.0  # > 0: the same on the LM head's logits (Gemma 2)
    sliding_window: int = 0  # > 0: local layers attend the last `sliding_window` keys only
    window_pattern: str = ""  # per-layer L (local) / G (global), repeated; "" -> all local
    tie_embeddings: bool | None = None  # None -> family default (gpt2 tied, llama untied)
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False  # lax.scan over stacked layers (compile time for deep models)
    remat: str = "none"  # none | full | dots
    attention: str = "auto"  # auto | xla | splash | cudnn (models/attention.py)
    head: str = "lm"  # lm: logits over the vocabulary; scalar: one score per position (RM, value)
    # LoRA (models/lora.py): rank > 0 adds adapters on the `lora_targets` projections (comma-
    # separated, LORA_TARGETS), scaled by alpha / rank; the base is then frozen and held in
    # `lora_base_dtype` ("" -> param_dtype). Set from `config.lora`, never from `config.model`.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = ""
    lora_base_dtype: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model.family: {self.family!r}; expected one of {FAMILIES}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"unknown model.remat: {self.remat!r}; expected none, full or dots")
        if self.attention not in ("auto", "xla", "splash", "cudnn"):
            raise ValueError(
                f"unknown model.attention: {self.attention!r}; expected auto, xla, splash or cudnn"
            )
        if self.rope_scaling not in ("none", "linear", "llama3"):
            raise ValueError(
                f"unknown model.rope_scaling: {self.rope_scaling!r}; expected none, linear or "
                "llama3"
            )
        if self.head not in ("lm", "scalar"):
            raise ValueError(f"unknown model.head: {self.head!r}; expected lm or scalar")
        if self.mlp not in ("",) + MLPS:
            raise ValueError(f"unknown model.mlp: {self.mlp!r}; expected one of {MLPS}")
        if set(self.window_pattern) - {"L", "G"}:
            raise ValueError(
                f"model.window_pattern={self.window_pattern!r} may hold only L (local) and "
                "G (global), e.g. 'LG' or 'LLLLLG'"
            )
        gpt2_only = (self.family == "gpt2") and (
            self.qk_norm or self.norm_plus_one or self.sandwich_norms or self.sliding_window
        )
        if gpt2_only or (self.family == "gpt2" and self.rope_local_theta):
            raise ValueError(
                "model.qk_norm, norm_plus_one, sandwich_norms, sliding_window and "
                "rope_local_theta are llama-family options; set model.family=llama"
            )
        check_lora(self.lora_rank, self.lora_alpha, self.lora_targets, self.lora_base_dtype)
        set_ = functools.partial(object.__setattr__, self)
        if not self.n_kv_heads:
            set_("n_kv_heads", self.n_heads)
        if not self.head_dim:
            set_("head_dim", self.d_model // self.n_heads)
        if not self.d_ff:
            if self.family == "gpt2":
                set_("d_ff", 4 * self.d_model)
            else:
                set_("d_ff", 256 * math.ceil(int(8 * self.d_model / 3) / 256))
        if self.tie_embeddings is None:
            set_("tie_embeddings", self.family == "gpt2")
        if self.lora_on("head") and self.head == "lm" and self.tie_embeddings:
            raise ValueError(
                "lora.targets has 'head' but this model's head is its embedding "
                "(tie_embeddings); target 'embed', or drop 'head'"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not a multiple of "
                f"model.n_kv_heads={self.n_kv_heads}"
            )

    def lora_target_list(self) -> tuple[str, ...]:
        return target_list(self.lora_targets)

    def lora_on(self, target: str) -> bool:
        """Whether `target` (one of LORA_TARGETS) carries an adapter in this model."""
        return self.lora_rank > 0 and target in self.lora_target_list()

    @property
    def use_bias(self) -> bool:
        return self.family == "gpt2"

    @property
    def mlp_kind(self) -> str:
        """The MLP computed: `mlp`, or the family's default. `mlp` itself stays "" by default
        so checkpoints written before the field existed still compare equal."""
        return self.mlp or ("gelu" if self.family == "gpt2" else "swiglu")

    def layer_kinds(self) -> tuple[bool, ...]:
        """Per layer: True where it is local (attends a sliding window), False where global."""
        if not self.sliding_window:
            return (False,) * self.n_layers
        pattern = self.window_pattern or "L"
        return tuple(pattern[i % len(pattern)] == "L" for i in range(self.n_layers))

    def attended_keys(self, ctx: int) -> int:
        """Keys one query attends with `ctx` keys in view, summed over layers: a local layer sees
        at most `sliding_window` of them. What FLOP counts multiply the attention cost by (the
        PaLM convention: every key in view counts, the causal mask's zeros included)."""
        w = self.sliding_window
        return sum(min(ctx, w) if local else ctx for local in self.layer_kinds())


# The architecture fields a run may set beside a preset (`config.model.<field>`, None keeping the
# preset's), with their types: all but the family, sizes and layout the experiments name
# themselves and the head a stage picks, the numerics (dtype, remat, attention) and param dtype.
_NOT_ARCH = ("family", "vocab_size", "max_len", "n_kv_heads", "dtype", "param_dtype",
             "scan_layers", "remat", "attention", "head", *LORA_FIELDS)  # fmt: skip
ARCH_FIELDS: dict[str, type] = {
    f.name: bool if f.default is None else type(f.default)  # tie_embeddings: None -> bool
    for f in dataclasses.fields(ModelConfig)
    if f.name not in _NOT_ARCH
}


# GPT-2 sizes (Radford et al. 2019) and the InstructGPT policy sizes (GPT-3 1.3B, 6.7B, 175B;
# Brown et al. 2020, Table 2.1). Vocabulary 50257 padded to 50304 (a multiple of 128).
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, vocab_size=512, max_len=256),
    "mini": dict(d_model=128, n_layers=4, n_heads=4, vocab_size=512, max_len=256),  # CPU demos
    "small": dict(d_model=768, n_layers=12, n_heads=12),
    "medium": dict(d_model=1024, n_layers=24, n_heads=16),
    "large": dict(d_model=1280, n_layers=36, n_heads=20),
    "xl": dict(d_model=1600, n_layers=48, n_heads=25),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=16, max_len=2048),
    "6b": dict(d_model=4096, n_layers=32, n_heads=32, max_len=2048),
    "175b": dict(d_model=12288, n_layers=96, n_heads=96, max_len=2048),
}


def preset(size: str, **overrides) -> ModelConfig:
    """Returns the `ModelConfig` of a named size, with non-default overrides applied."""
    if size not in PRESETS:
        raise ValueError(f"unknown model.size: {size!r}; expected one of {tuple(PRESETS)}")
    kw = dict(PRESETS[size])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**kw)
