"""RM stage: ties reported apart from accuracy, and what it refuses before training starts."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import pretrain, rm
from launch import mesh as mesh_lib
from rlhf_jax import losses
from rlhf_jax.stages import lm
from rlhf_jax.stages import rm as rm_stage


def naive_accuracy_and_ties(scores, ranks):
    wins = ties = pairs = 0
    for s, r in zip(scores, ranks, strict=True):
        for i in range(len(r)):
            for j in range(len(r)):
                if r[i] >= 0 and r[j] >= 0 and r[i] < r[j]:  # i ranked strictly better
                    pairs += 1
                    wins += s[i] > s[j]
                    ties += s[i] == s[j]
    return wins / pairs, ties / pairs


def test_equal_scores_are_ties_not_errors():
    ranks = jnp.array([[0, 1, 2], [0, 0, 1]])
    kmask = jnp.ones((2, 3))
    _, m = losses.rm_loss(jnp.zeros((2, 3)), ranks, kmask)  # a fresh head: every score equal
    assert float(m["accuracy"]) == 0.0 and float(m["tie_frac"]) == 1.0
    scores = np.array([[1.0, 1.0, -2.0], [0.5, 0.1, 0.3]], np.float32)
    _, m = losses.rm_loss(jnp.asarray(scores), ranks, kmask)
    acc, ties = naive_accuracy_and_ties(scores, np.asarray(ranks))
    np.testing.assert_allclose([m["accuracy"], m["tie_frac"]], [acc, ties], rtol=1e-6)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    wd = tmp_path_factory.mktemp("pre")
    c = pretrain.get_config()
    c.train.update(steps=1, batch_size=4, seq_len=32, warmup_steps=0, log_every=1, ckpt_every=1)
    c.train.eval_every = 0
    c.data.cache = False
    lm.run(c, mesh_lib.build_mesh(c.mesh, jax.devices()[:1]), str(wd))
    return str(wd)


def test_missing_norm_data_stops_before_training(pretrained, tmp_path):
    c = rm.get_config()
    c.init_from = pretrained  # a pretraining workdir: no demonstrations to normalise against
    c.train.steps = 2
    mesh = mesh_lib.build_mesh(c.mesh, jax.devices())
    with pytest.raises(ValueError, match="set config.rm.norm_data"):
        rm_stage.run(c, mesh, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")  # nothing was trained


def test_grad_accum_is_refused_in_one_line(tmp_path):
    c = rm.get_config()
    c.train.grad_accum = 2
    mesh = mesh_lib.build_mesh(c.mesh, jax.devices()[:1])
    with pytest.raises(ValueError, match=r"^train.grad_accum=2: the RM stage does not accumulate"):
        rm_stage.run(c, mesh, str(tmp_path / "w"))
