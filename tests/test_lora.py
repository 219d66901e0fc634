"""LoRA (models/lora.py, infra/state.py, infra/restore.py): fresh adapters leave the model its
base exactly; an adapter's forward is the merged weight's (numpy); adapters shard like their
base; one step moves the adapters and not a bit of the base, and only adapters have optimizer
state; the stages' runs are test_lora_stages.py's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import sft
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import lora
from rlhf_jax.models import transformer as M
from rlhf_jax.stages import lm, setup

ALL = "q,k,v,o,up,gate,down"
FAMILIES = {  # a tied GPT-2 with an embedding adapter; a scanned llama with a head adapter
    "gpt2": dict(family="gpt2", lora_targets=ALL + ",embed"),
    "llama": dict(family="llama", scan_layers=True, lora_targets=ALL + ",embed,head"),
}


def lora_cfg(family, rank=4, **kw):
    return model_config.preset("tiny", dtype="float32", lora_rank=rank, lora_alpha=8.0,
                               **{**FAMILIES[family], **kw})  # fmt: skip


def pure(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def forward(cfg, params, tokens):
    logits, _ = jax.jit(lambda p, t: nnx.merge(M.abstract(cfg)[0], p)(t))(params, tokens)
    return np.asarray(logits)


def numpy_merge(cfg, params):
    """W + A B alpha / r for every adapter, by a naive loop over the flattened tree."""
    flat = {path: np.asarray(x, np.float64) for path, x in _flat(params).items()}
    scale = cfg.lora_alpha / cfg.lora_rank
    out = {}
    for path, w in flat.items():
        if any(str(k).endswith("_lora") for k in path):
            continue
        a = flat.get(path[:-1] + (f"{path[-1]}_lora", "a"))
        if a is not None:
            b = flat[path[:-1] + (f"{path[-1]}_lora", "b")]
            r = a.shape[-1]
            if "layers" in path:  # scanned: one product per layer
                delta = np.stack([a[i].reshape(-1, r) @ b[i].reshape(r, -1) for i in range(len(a))])
            else:
                delta = a.reshape(-1, r) @ b.reshape(r, -1)
            w = w + delta.reshape(w.shape) * scale
        out[path] = w
    return _unflat(out)


def _flat(tree, path=()):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, (*path, k)) if isinstance(v, dict) else {(*path, k): v})
    return out


def _unflat(flat):
    out = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fresh_adapters_are_the_base_and_forward_is_the_merged_weights(family):
    cfg = lora_cfg(family)
    params = pure(M.build(cfg, seed=0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
    base_cfg = lora.base_config(cfg)
    base = lora.split_adapters(params)[1]
    # B = 0: the LoRA model computes exactly its base, logit for logit.
    np.testing.assert_array_equal(forward(cfg, params, tokens), forward(base_cfg, base, tokens))

    # Random B: the adapted forward is the base model's with W + A B alpha / r (numpy merge).
    rng = np.random.default_rng(1)
    noisy = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype)
        if str(p[-1].key) == "b" else x,
        params,
    )  # fmt: skip
    merged = numpy_merge(cfg, noisy)
    got = forward(cfg, noisy, tokens)
    want = forward(base_cfg, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), merged), tokens)
    assert np.abs(got - forward(base_cfg, base, tokens)).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # lora.merge (what a LoRA workdir is read as) is the numpy merge.
    ours = jax.tree.map(np.asarray, lora.merge(cfg, noisy))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), ours, merged)


def test_adapters_shard_along_their_base_axes_and_replicate_the_rank():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 2), sharding.MESH_AXES)
    cfg = model_config.preset("tiny", family="llama", lora_rank=4, lora_targets=ALL + ",head")
    _, _, sh = state_lib.param_shardings(cfg, mesh, sharding.DEFAULT_RULES)
    attn, mlp = sh["blocks"][0]["attn"], sh["blocks"][0]["mlp"]

    def spec(s):  # trailing replicated dims dropped
        out = tuple(s.spec)
        while out and out[-1] is None:
            out = out[:-1]
        return out

    # q [D, N, H] is (fsdp, tensor); its A [D, r] keeps fsdp, its B [r, N, H] keeps tensor.
    assert spec(attn["q"]) == ("fsdp", "tensor") and spec(attn["q_lora"]["a"]) == ("fsdp",)
    assert spec(attn["q_lora"]["b"]) == (None, "tensor")
    assert spec(attn["o_lora"]["a"]) == ("tensor",) and spec(attn["o_lora"]["b"]) == (None, "fsdp")
    assert spec(mlp["down_lora"]["a"]) == ("tensor",)
    assert spec(mlp["up_lora"]["b"]) == (None, "tensor")
    assert spec(sh["lm_head_lora"]["a"]) == ("fsdp",)
    assert spec(sh["lm_head_lora"]["b"]) == (None, "tensor")


def test_one_step_moves_adapters_only_and_only_they_have_optimizer_state():
    mesh = mesh_lib.build_mesh(sft.get_config().mesh, jax.devices())
    rules = sharding.DEFAULT_RULES
    cfg = lora_cfg("llama", lora_base_dtype="bfloat16")
    tx = state_lib.make_optimizer(state_lib.OptimConfig(lr=1e-2, warmup_steps=0, total_steps=4))
    graphdef, state, shardings = state_lib.create_train_state(cfg, tx, mesh, rules, seed=0)
    trainable, frozen = lora.split_trainable(state["params"])
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable))
    assert jax.tree.structure(trainable) == jax.tree.structure(lora.split_adapters(trainable)[0])
    # AdamW's two moments per trainable leaf, plus step counts: nothing of the base.
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert len(moments) == 2 * len(jax.tree.leaves(trainable))
    assert sum(x.nbytes for x in moments) == 2 * nbytes(trainable) < nbytes(frozen) / 2
    before = jax.device_get(state["params"])

    train, _ = lm.compile_steps(graphdef, tx, shardings, mesh, rules, grad_accum=1)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, (8, 17))
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": np.ones((8, 16), np.float32)}
    state, m = train(state, sharding.put_batch(batch, mesh, rules))
    after = jax.device_get(state["params"])
    same = lambda a, b: all(  # noqa: E731
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    assert same(lora.split_trainable(after)[1], lora.split_trainable(before)[1])  # bit for bit
    bs = lambda t: [x for p, x in _flat(t).items() if p[-1] == "b"]  # noqa: E731
    assert all(np.abs(y).max() > 0 for y in bs(after)) and all(not x.any() for x in bs(before))
    assert np.isfinite(float(m["train/loss"]))


def test_bad_lora_config_is_one_line():
    c = sft.get_config()
    c.lora.rank = -1
    with pytest.raises(ValueError, match=r"^config\.lora\.rank=-1 must be >= 0"):
        setup.check_lora(c)
    c.lora.rank, c.lora.targets = 4, "q,v,attn"
    with pytest.raises(ValueError, match=r"^unknown config\.lora\.targets entry 'attn'.*q,k,v,o"):
        setup.check_lora(c)
    with pytest.raises(ValueError, match="head is its embedding"):
        model_config.preset("tiny", lora_rank=4, lora_targets="q,head")  # GPT-2: tied
