"""Bad input found before training starts, each as one line naming what is wrong and where."""

import dataclasses
import os
import subprocess
import sys

import jax
import pytest
from cpu_env import cpu_env

from experiments import common, ppo_ptx, pretrain, sft
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import paths, sharding
from rlhf_jax.models import config as model_config
from rlhf_jax.stages import lm, loop, ppo, setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def entry(*argv):
    env = cpu_env()
    cmd = [sys.executable, "-m", "launch.run", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_missing_config_file_is_one_line(tmp_path):
    proc = entry("--config", "experiments/no_such.py:size=tiny", "--workdir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --config file not found: experiments/no_such.py"


def test_missing_init_from_names_the_key(tmp_path):
    proc = entry(
        "--config", "experiments/sft.py", "--workdir", str(tmp_path / "w"),
        "--config.init_from=runs/does_not_exist",
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (
        f"error: config.init_from={os.path.join(ROOT, 'runs/does_not_exist')!r} does not exist"
    )
    assert "Traceback" not in proc.stderr and "tokenizer" not in proc.stderr


def test_relative_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = ppo_ptx.get_config()
    c.init_from, c.ppo.reward_from = "runs/sft", "hf:models/rm"
    c.data.train, c.tokenizer.path = "a.jsonl,data/*.jsonl", "tok.model"
    c.ppo.reference_from = "gs://bucket/ref"
    paths.resolve_config(c)
    assert c.init_from == str(tmp_path / "runs/sft")
    assert c.ppo.reward_from == f"hf:{tmp_path / 'models/rm'}"
    assert c.data.train == f"{tmp_path / 'a.jsonl'},{tmp_path / 'data/*.jsonl'}"
    assert c.tokenizer.path == str(tmp_path / "tok.model")
    assert c.ppo.reference_from == "gs://bucket/ref"  # remote: untouched
    assert c.ppo.reward_fn == "" and c.stage == "ppo"  # not paths: untouched


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("")
    proc = entry("--config", "experiments/pretrain.py", "--workdir", str(tmp_path / "taken"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"error: --workdir {tmp_path / 'taken'} exists and is not a directory"
    )


def test_negative_steps_are_refused_and_the_failed_start_leaves_no_workdir(tmp_path):
    work = tmp_path / "new"
    proc = entry("--config", "experiments/pretrain.py", "--workdir", str(work),
                 "--config.train.steps=-5")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: config.train.steps=-5 must be >= 0"
    assert not work.exists()  # created by the failed start, removed by it
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    proc = entry("--config", "experiments/pretrain.py", "--workdir", str(work),
                 "--config.train.steps=-5")  # fmt: skip
    assert proc.returncode == 2 and (work / "keep.txt").read_text() == "mine"  # not its to remove


def test_empty_data_file_is_named_when_no_tokenizer_can_be_trained(tmp_path):
    c = pretrain.get_config()
    c.data.train = str(tmp_path / "empty.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"no non-empty text in config.data.train='.*empty.jsonl'"):
        setup.load_tokenizer(c, str(tmp_path / "w"))


def test_sft_refuses_steps_and_epochs_together():
    c = sft.get_config()
    c.train.steps = 7  # the user's override, which epochs would silently win over
    with pytest.raises(ValueError, match=r"train.epochs=1.0 and train.steps=7 are both set"):
        lm.total_steps(c, {"train_demos": 100})
    c.train.epochs = 0.0
    assert lm.total_steps(c, {"train_demos": 100}) == 7
    c.train.update(epochs=2.0, steps=0, batch_size=16)
    assert lm.total_steps(c, {"train_demos": 100}) == 13  # ceil(2 * 100 / 16)


def test_nan_stop_before_any_checkpoint_says_so():
    with pytest.raises(FloatingPointError) as e:
        loop._finite_or_raise([(3, {"train/loss": float("nan")})], "train/loss", None)
    assert "None" not in str(e.value) and "no checkpoint was written" in str(e.value)
    with pytest.raises(FloatingPointError, match="the last checkpoint is step 2"):
        loop._finite_or_raise([(3, {"train/loss": float("inf")})], "train/loss", 2)


@pytest.mark.parametrize("key", ["rollout_batch", "minibatch", "ptx_batch"])
def test_ppo_batch_that_does_not_divide_the_devices_is_refused(tmp_path, key):
    c = ppo_ptx.get_config()
    c.init_from, c.ppo.reward_fn = str(tmp_path), "tests.ppo_rewards:count_apples"
    c.ppo[key] = 12  # 8 data-parallel devices
    mesh = mesh_lib.build_mesh(c.mesh, jax.devices())
    with pytest.raises(ValueError, match=rf"^ppo.{key}=12 does not divide over the 8 data-"):
        ppo.run(c, mesh, str(tmp_path / "w"))


def test_put_global_and_to_host_round_trip():
    c = ppo_ptx.get_config()
    mesh = mesh_lib.build_mesh(c.mesh, jax.devices())
    rules = sharding.normalize_rules(c.sharding.rules)
    x = jax.numpy.arange(16 * 3).reshape(16, 3)
    keys = jax.random.split(jax.random.key(0), 16)
    g = sharding.put_global({"x": x, "k": keys}, mesh, rules)
    assert g["x"].sharding.spec[0] == ("data", "fsdp") or g["x"].sharding.spec[0] == "data"
    assert (sharding.to_host(g["x"]) == x).all()
    assert (jax.random.key_data(g["k"]) == jax.random.key_data(keys)).all()


class _Tok:
    vocab_size = 500

    def check_model_vocab(self, n):
        assert n >= self.vocab_size


def test_every_architecture_field_is_a_config_key_and_reaches_the_model(monkeypatch):
    """A ModelConfig field the experiments cannot set would leave a model family unreachable
    from pretraining; with init_from, a set field the stored model contradicts is one error."""
    every = {f.name for f in dataclasses.fields(model_config.ModelConfig)}
    # head a stage picks; the lora_* fields are config.lora's (setup.lora_fields)
    assert every - set(common.model_config()) == {"head", *model_config.LORA_FIELDS}
    c = pretrain.get_config()
    unset = setup.model_config_from(c, 500)
    preset = model_config.preset("tiny")
    assert all(getattr(unset, f) == getattr(preset, f) for f in model_config.ARCH_FIELDS)
    c.model.update(family="llama", sliding_window=8, window_pattern="LG", qk_norm=True)
    c.model.rope_theta = 1e6
    cfg = setup.model_config_from(c, 500)
    assert (cfg.sliding_window, cfg.qk_norm, cfg.rope_theta) == (8, True, 1e6)
    assert cfg.layer_kinds() == (True, False) * (cfg.n_layers // 2)

    stored = dataclasses.asdict(model_config.preset("tiny", family="llama", vocab_size=512))
    monkeypatch.setattr(setup, "read_init_meta", lambda path: {"model": stored})
    c = sft.get_config()
    c.init_from, c.model.qk_norm = "runs/pretrain", False  # the stored value: fine
    assert setup.resolve_model(c, _Tok())[0].qk_norm is False
    c.model.sliding_window = 8
    with pytest.raises(ValueError, match=r"^config.model.sliding_window=8 but init_from "):
        setup.resolve_model(c, _Tok())
