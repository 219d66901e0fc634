"""Shared by the Hugging Face parity tests (test_hf.py, test_hf_families.py): tiny transformers
models saved once per module, our logits through one jitted forward per config, theirs."""

import contextlib

import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh

from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import hf
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.sampling import sampler

RULES = sharding.DEFAULT_RULES


def perturbed(model, scale: float = 0.1):
    """`model` with every weight moved off transformers' init (so every mapping matters)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def dirs_fixture(build):
    """A module fixture: kind -> (directory, transformers model `build(kind)`), built lazily."""

    @pytest.fixture(scope="module")
    def hf_dirs(tmp_path_factory):
        cache = {}

        def get(kind):
            if kind not in cache:
                model = build(kind)
                path = str(tmp_path_factory.mktemp(kind))
                model.save_pretrained(path, safe_serialization=True)
                cache[kind] = (path, model)
            return cache[kind]

        return get

    return hf_dirs


def mesh(n: int) -> Mesh:
    shape = (2, 2, 2) if n == 8 else (1, 1, 1)
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), ("data", "fsdp", "tensor"))


_FORWARDS = {}


def logits(cfg, params, tokens, mesh=None):
    """Our logits (or scores) [B, T, ...] as numpy, through one jitted forward per config."""
    key = (cfg, mesh)
    if key not in _FORWARDS:
        graphdef = model_lib.abstract(cfg)[0]

        def forward(params, tokens):
            rules = sharding.use_rules(mesh, RULES) if mesh else contextlib.nullcontext()
            with rules:
                return state_lib.merge(graphdef, params)(tokens)[0]

        _FORWARDS[key] = jax.jit(forward)
    return np.asarray(_FORWARDS[key](params, tokens))


def hf_logits(model, tokens, **kw):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens)), **kw).logits.float().numpy()


def tokens(vocab: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def greedy_both(model, cfg, params, prompts, new_tokens: int):
    """(ours, theirs): `new_tokens` greedy tokens after `prompts` [B, P] from our sampler and
    from transformers' generate, EOS off so both run the full length, [B, P + new_tokens]."""
    graphdef = model_lib.abstract(cfg)[0]
    sample = sampler.make_sampler(graphdef, max_new_tokens=new_tokens, eos_id=-1, pad_id=0)
    keys = jax.random.split(jax.random.key(0), prompts.shape[0])
    ours = sample(params, prompts, np.ones_like(prompts, bool), keys, greedy=True)["tokens"]
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor(prompts),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    return np.asarray(ours), theirs


def export_and_reload(params, cfg, path: str, like):
    """Exports to `path`, reloads it with transformers and checks it is `like`'s class."""
    hf.export_hf(params, cfg, path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(reloaded) is type(like)
    return reloaded
