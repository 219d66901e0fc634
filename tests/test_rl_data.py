"""What PPO and GRPO share (rlhf_jax/stages/rl_data.py): group rows, eval batches whose fill is
weighted out, and errors that name the key a user sets. No model, no compile: a character
tokenizer stands in for a trained one."""

import json

import numpy as np
import pytest

from experiments import grpo, ppo_ptx
from rlhf_jax.data import sft_data
from rlhf_jax.stages import rl_data


class CharTok:
    """One id per character (ids 4..), as much of the tokenizer interface as prompts and
    packed text use."""

    pad_id, bos_id, eos_id, eos_ids, add_bos = 0, 1, 2, (2,), True

    def encode(self, text):
        return [4 + ord(ch) % 500 for ch in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return "".join(chr(i - 4) for i in ids)

    def fingerprint(self):
        return b"char"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class Prompts:
    """A fixed prompt batch iterator with the grain get/set_state interface."""

    def __init__(self, batch):
        self.batch, self.n = batch, 0

    def __next__(self):
        self.n += 1
        return self.batch

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = state["n"]


def test_rollout_rows_hold_each_prompt_g_times_in_consecutive_rows():
    tokens = np.array([[10, 11], [20, 21]], np.int32)
    batch = {"tokens": tokens, "mask": np.ones((2, 2), bool), "index": np.array([3, 7])}
    ptx = Prompts({"inputs": np.arange(6).reshape(2, 3)})
    data = rl_data.RolloutData(Prompts(batch), group_size=3, ptx=ptx, n_ptx=4)
    out = next(data)
    # Row n * G + g is prompt n (np.tile would interleave the prompts and break the groups
    # that grpo.group_advantages reads from consecutive rows).
    np.testing.assert_array_equal(out["tokens"][:, 0], [10, 10, 10, 20, 20, 20])
    np.testing.assert_array_equal(out["sample"], [9, 10, 11, 21, 22, 23])  # index * G + g
    assert "index" not in out and out["ptx_inputs"].shape == (2, 4, 3)  # [b, n_ptx, L]
    assert data.get_state() == {"prompts": {"n": 1}, "ptx": {"n": 4}}
    data.set_state({"prompts": {"n": 0}, "ptx": {"n": 0}})
    assert data.prompts.n == 0 and data.ptx.n == 0


def test_eval_averages_count_every_held_out_prompt_once():
    """5 prompts in batches of 4 fill the last batch with 3 repeats: weight 0."""
    config = grpo.get_config()
    prompts = [f"question {i}" for i in range(5)]
    batches = rl_data.eval_batches(prompts, CharTok(), config, "grpo", batch=4, group_size=2)
    assert len(batches) == 2 and all(b["tokens"].shape[0] == 8 for b in batches)
    sample = np.concatenate([b["sample"] for b in batches])
    np.testing.assert_array_equal(sample[:10], np.arange(10))  # prompt i's rows 2i, 2i + 1
    weight = np.concatenate([b["weight"] for b in batches])
    np.testing.assert_array_equal(weight, [1] * 10 + [0] * 6)
    # A per-row value: the prompt's index. Its mean over the 5 prompts is 2; the plain mean
    # over the 16 rows (repeats of prompts 0, 1, 2 included) would be 1.625.
    rows = [{"weight": b["weight"], "prompt": b["sample"] // 2} for b in batches]
    assert rl_data.weighted_means(rows) == {"eval/prompt": pytest.approx(2.0)}
    assert rl_data.eval_batches([], CharTok(), config, "grpo", batch=4) == []


@pytest.mark.parametrize(
    "get_config,stage,key",
    [(ppo_ptx.get_config, "ppo", "rollout_batch"), (grpo.get_config, "grpo", "prompts")],
)
def test_too_few_prompts_names_the_stage_key(tmp_path, get_config, stage, key):
    config = get_config()
    config.data.train = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}] * 5)
    config.data.eval_fraction = 0.0
    config[stage][key] = 8
    with pytest.raises(ValueError, match=rf"^{stage}.{key}=8 prompts per iteration, .* only 5"):
        rl_data.read_prompts(config, CharTok(), stage, key)
    config[stage][key] = 4
    short = sft_data.prompt_ids(CharTok(), config.data.prompt_template, "hi")
    config[stage].prompt_len = len(short) + 12
    config.data.train = write_jsonl(
        tmp_path / "q.jsonl", [{"prompt": "hi"}] * 4 + [{"prompt": "x" * 40}]
    )
    ex, _, info = rl_data.read_prompts(config, CharTok(), stage, key)
    assert ex["tokens"].shape == (5, len(short) + 12) and info["prompts_cut"] == 1


def test_ptx_errors_name_data_ptx_and_the_stage_keys(tmp_path):
    config = grpo.get_config()
    config.grpo.update(ptx_coef=1.0, ptx_batch=16, ptx_seq_len=32)
    with pytest.raises(ValueError, match=r"^grpo.ptx_coef > 0 needs data.ptx"):
        rl_data.ptx_data(config, CharTok(), str(tmp_path), "grpo")
    config.data.ptx = write_jsonl(tmp_path / "t.jsonl", [{"text": "a short document"}] * 3)
    with pytest.raises(ValueError, match=r"data.ptx=.* grpo.ptx_seq_len=32 .* grpo.ptx_batch=16"):
        rl_data.ptx_data(config, CharTok(), str(tmp_path), "grpo")
    config.grpo.ptx_coef = 0.0
    assert rl_data.ptx_data(config, CharTok(), str(tmp_path), "grpo") is None


def test_rl_stages_refuse_train_keys_they_do_not_read():
    config = ppo_ptx.get_config()
    config.train.grad_accum = 2
    with pytest.raises(ValueError, match=r"^train.grad_accum=2: the grpo stage does not accum"):
        rl_data.check_rl_train_keys(config, "grpo", "minibatch")
    config.train.update(grad_accum=1, steps=0)
    with pytest.raises(ValueError, match=r"^train.steps=0: the ppo stage needs at least 1"):
        rl_data.check_rl_train_keys(config, "ppo", "minibatch")


def test_reward_fn_errors_name_the_stage_key():
    config = grpo.get_config()
    assert rl_data.load_reward_fn(config, "grpo") is None
    config.grpo.reward_fn = "no_colon"
    with pytest.raises(ValueError, match=r"^grpo.reward_fn='no_colon' is not of the form"):
        rl_data.load_reward_fn(config, "grpo")
    config.grpo.reward_fn = "test_rl_data:CharTok"
    assert rl_data.load_reward_fn(config, "grpo") is CharTok
