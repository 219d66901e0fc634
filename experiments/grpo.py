"""GRPO-ptx (and RLOO): G samples per prompt, group advantages, no value model
(Shao et al. 2024; RLOO: Ahmadian et al. 2024; Dr. GRPO: Liu et al. 2025).

The KL to the SFT policy goes in the loss as GRPO's per-token k3 (`grpo.kl_in=loss`, default) or
in the reward as PPO's (`grpo.kl_in=reward`); `grpo.ptx_coef` > 0 adds the pretraining term to
the same loss (rlhf_jax/stages/grpo.py).

Tiny models, CPU, after experiments/{pretrain,sft,rm}.py (about 30 s on 2 cores; measured:
eval/score -0.51 -> -0.23 over 30 iterations at eval/kl_per_seq 1.6 nats, a noisy tiny RM):
  python -m launch.run --config experiments/grpo.py --workdir runs/grpo_tiny \
      --config.init_from=runs/sft_tiny --config.grpo.reward_from=runs/rm_tiny

RLOO with Dr. GRPO's length-unbiased loss and the KL in the reward:
  python -m launch.run --config experiments/grpo.py --workdir runs/rloo_tiny \
      --config.init_from=runs/sft_tiny --config.grpo.reward_from=runs/rm_tiny \
      --config.grpo.advantage=rloo --config.grpo.loss_norm=constant --config.grpo.kl_in=reward

DAPO's clip-higher and token-level loss (Yu et al. 2025) with TRL's batch-level reward scaling:
  ... --config.grpo.clip_high=0.28 --config.grpo.loss_norm=token --config.grpo.std_scope=batch

A reward function instead of an RM (code by design: `module:function(prompts, responses)`):
  --config.grpo.reward_from= --config.grpo.reward_fn=mymodule:score

Read `metrics.jsonl`: `grpo/score` and `eval/score` rise, `grpo/kl_per_seq` is the KL to the
reference in nats per response, `grpo/first_ratio_max` is 1 (on-policy first minibatch) and
`grpo/flat_groups` the fraction of prompts whose G samples scored alike (no signal).

Args (after the colon): size, family, fsdp, tensor. The architecture comes from init_from.
"""

import os

import ml_collections as mlc

from experiments import common

HERE = os.path.dirname(os.path.abspath(__file__))


def grpo_config() -> mlc.ConfigDict:
    return mlc.ConfigDict(
        dict(
            reward_from="",  # RM workdir (its normalisation bias is applied)
            reward_fn="",  # or "module:function(prompts, responses) -> scores"
            reference_from="",  # KL reference workdir; "" -> init_from (the SFT policy)
            group_size=8,  # G samples per prompt
            advantage="grpo",  # grpo (group mean / std) | rloo (leave-one-out mean)
            scale_std=True,  # False: Dr. GRPO (no std division)
            # the std that scales: group (GRPO) | batch (all prompts' scores, TRL's
            # scale_rewards="batch"); grpo advantage with scale_std only
            std_scope="group",
            kl_in="loss",  # loss (k3 per token, GRPO) | reward (log ratio summed, as PPO)
            beta=0.04,  # KL coefficient (GRPO paper)
            loss_norm="sequence",  # sequence (GRPO) | token (DAPO) | constant (Dr. GRPO)
            clip=0.2,  # PPO's epsilon: the ratio is clipped to [1 - clip, 1 + clip_high]
            # None -> clip; DAPO's clip-higher (epsilon_high) is 0.28 with clip 0.2
            clip_high=mlc.config_dict.placeholder(float),
            prompts=16,  # prompts per iteration (global); rows = prompts * group_size
            minibatch=32,  # rows per gradient step (global)
            epochs=1,  # passes over each rollout
            prompt_len=64,
            max_new_tokens=64,
            temperature=1.0,
            ptx_coef=0.0,  # gamma of the pretraining term; 0 = plain GRPO
            ptx_batch=16,
            ptx_seq_len=128,
            eval_prompts=32,  # held-out prompts per eval (at train.eval_every)
        )
    )


def get_config(arg=None):
    arg = common.parse_arg(arg, size="tiny", family="", fsdp=1, tensor=1)
    c = common.stage_config("grpo", arg)
    c.grpo = grpo_config()
    c.data.train = os.path.join(HERE, "data", "tiny_prompts.jsonl")
    c.data.eval_fraction = 0.05
    if arg.size in common.CPU_SIZES:
        c.model.dtype = "float32"  # CPU
        c.train.update(
            steps=30,
            lr=1e-4,
            warmup_steps=0,
            min_lr_ratio=1.0,
            weight_decay=0.0,
            log_every=5,
            eval_every=10,
            ckpt_every=10,
        )
        c.grpo.update(prompts=8, group_size=4, minibatch=16, prompt_len=48, max_new_tokens=24)
    else:
        c.train.update(
            steps=500,
            lr=1e-6,
            warmup_steps=0,
            min_lr_ratio=1.0,
            weight_decay=0.0,
            log_every=1,
            eval_every=25,
            ckpt_every=25,
        )
        c.grpo.update(prompts=64, group_size=8, minibatch=128, prompt_len=256, max_new_tokens=512)
    return c
