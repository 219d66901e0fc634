"""Shared by the Hugging Face parity tests (test_hf.py, test_hf_families.py): tiny transformers
models saved once per module, our logits through one jitted forward per config, theirs."""

import contextlib

import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh

from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import transformer as model_lib

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
