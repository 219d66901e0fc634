"""PPO-ptx (InstructGPT step 3): policy from SFT, value from the RM, frozen SFT reference for the
per-token KL penalty, and the pretraining log-likelihood term in the same loss.

Defaults and their sources (`ppo_config` below): beta = 0.02 and gamma
(ppo.ptx_coef) = 27.8 from InstructGPT (Ouyang et al. 2022); value initialised from the RM
(InstructGPT); adaptive KL (off by default) from Ziegler et al. 2019; clip 0.2, lambda 0.95,
discount 1, 4 epochs are the usual PPO defaults for language models.

Tiny models, CPU, after experiments/{pretrain,sft,rm}.py (a few minutes on 2 cores):
  python -m launch.run --config experiments/ppo_ptx.py --workdir runs/ppo_ptx_tiny \
      --config.init_from=runs/sft_tiny --config.ppo.reward_from=runs/rm_tiny

Plain PPO (gamma = 0) is `experiments/ppo_ptx.py:ptx=0` (or `--config.ppo.ptx_coef=0`).
A rule-based reward instead of the RM: `--config.ppo.reward_fn=my_module:my_reward`.

Args (after the colon): size, family, fsdp, tensor, ptx (0 = plain PPO, 1 = PPO-ptx).
Keys every stage shares are `train.*`: `train.steps` iterations, the policy's `train.lr` (and
its schedule: `train.warmup_steps` counted in optimizer updates, `train.min_lr_ratio`, ...),
`train.eval_every` iterations; `ppo.*` holds what has no counterpart (`ppo.value_lr`, ...).

Planned for TPU (`python -m launch.aot`, no TPU needed; the numbers are in BENCHMARKS.md):
  InstructGPT's 1.3B policy with a 6B reward and value model, the frozen reference and reward
  models in bf16 (`ppo.frozen_dtype`), v5e:4x4: the update 11.65 of 15.75 GiB per chip; a
  v5e:2x4 is refused (`error: update needs 19.19 GiB per chip, v5e:2x4 chips have 15.75 GiB`):
  python -m launch.aot --config experiments/ppo_ptx.py:size=1.3b,fsdp=16 --topology v5e:4x4 \
      --rm_size 6b --config.model.scan_layers=True --config.model.remat=full \
      --config.ppo.frozen_dtype=bfloat16
  6B policy, 6B reward and value models, v5p:2x2x4: the update 21.5 of 95.7 GiB per chip
  (13.98 GiB with `--rm_size 1.3b`, a value model smaller than the policy):
  python -m launch.aot --config experiments/ppo_ptx.py:size=6b,fsdp=16 --topology v5p:2x2x4 \
      --rm_size 6b --config.model.scan_layers=True --config.model.remat=full \
      --config.ppo.frozen_dtype=bfloat16
  InstructGPT's 175B policy with a 6B reward and value model, v5p:4x4x4 (64 chips): the update
  80.1 of 95.7 GiB per chip; a v5p:2x4x4 is refused (`error: update needs 128.46 GiB per chip`):
  python -m launch.aot --config experiments/ppo_ptx.py:size=175b,fsdp=16,tensor=4 \
      --topology v5p:4x4x4 --rm_size 6b --config.model.scan_layers=True \
      --config.model.remat=full --config.ppo.frozen_dtype=bfloat16
  (`--rm_size` sizes the models a run reads from `ppo.reward_from`.)
"""

import os

import ml_collections as mlc

from experiments import common

HERE = os.path.dirname(os.path.abspath(__file__))


def ppo_config() -> mlc.ConfigDict:
    """PPO-ptx settings. Sources: InstructGPT (Ouyang et al. 2022) for beta = 0.02, gamma
    (ptx_coef) = 27.8 and the value function initialised from the RM; Ziegler et al. (2019) for
    the adaptive KL controller; the rest are the usual PPO defaults for language models
    (clip 0.2, GAE lambda 0.95, discount 1, 4 epochs over each rollout, whitened advantages)."""
    return mlc.ConfigDict(
        dict(
            reward_from="",  # RM workdir (its normalisation bias is applied)
            reward_fn="",  # or "module:function(prompts, responses) -> scores"
            reference_from="",  # KL reference workdir; "" -> init_from (the SFT policy)
            value_init="rm",  # rm (InstructGPT) | sft (fresh scalar head on the SFT backbone)
            frozen_dtype="",  # reference and reward params: "" -> model.param_dtype; bfloat16
            rollout_batch=64,  # prompts per iteration (global)
            minibatch=16,  # rows per gradient step (global)
            epochs=4,  # passes over each rollout
            prompt_len=64,  # prompts are left-padded / cut (from the left) to this
            max_new_tokens=64,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            beta=0.02,  # KL coefficient (InstructGPT); the start value when adaptive
            kl_kind="k1",  # per-token KL estimate: k1 (log ratio, as InstructGPT) | k2 | k3 | abs
            adaptive_kl=False,
            kl_target=6.0,  # nats per sequence (Ziegler et al. 2019)
            kl_horizon=10000,
            ptx_coef=27.8,  # gamma of PPO-ptx (InstructGPT); 0 = plain PPO
            ptx_batch=16,  # pretraining sequences per minibatch (global)
            ptx_seq_len=128,
            discount=1.0,
            lam=0.95,
            clip=0.2,
            value_clip=0.2,
            vf_coef=0.1,
            whiten_advantages=True,
            score_clip=0.0,  # > 0 clips RM scores to [-score_clip, score_clip]
            whiten_scores=False,
            no_eos_penalty=0.0,  # added to the score of a response that hit the length limit
            value_lr=1e-5,  # the policy's is train.lr, with the same schedule
            eval_prompts=64,  # held-out prompts per eval (at train.eval_every)
            sample_rows=4,  # rows of the logged sample table
        )
    )


def get_config(arg=None):
    arg = common.parse_arg(arg, size="tiny", family="", fsdp=1, tensor=1, ptx=1)
    c = common.stage_config("ppo", arg)
    c.ppo = ppo_config()
    # The policy's optimizer: a constant learning rate 1e-5, no warmup, no weight decay.
    c.train.update(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, grad_clip=1.0)
    c.train.eval_every = 10  # iterations; 0 disables
    c.data.train = os.path.join(HERE, "data", "tiny_prompts.jsonl")
    c.data.ptx = os.path.join(HERE, "data", "tiny_corpus.jsonl")
    c.data.eval_fraction = 0.1
    if not arg.ptx:
        c.ppo.ptx_coef = 0.0
    if arg.size in common.CPU_SIZES:
        c.model.dtype = "float32"  # CPU
        c.train.update(steps=30, lr=3e-4, log_every=5, eval_every=10, ckpt_every=10)
        c.ppo.update(
            rollout_batch=32,
            minibatch=8,
            epochs=2,
            prompt_len=32,
            max_new_tokens=16,
            value_lr=3e-4,
            ptx_batch=8,
            ptx_seq_len=64,
            eval_prompts=32,
        )
    else:
        c.train.update(steps=500, log_every=1, ckpt_every=20)
        c.ppo.update(
            rollout_batch=64, minibatch=16, prompt_len=256, max_new_tokens=256, ptx_seq_len=512
        )
    return c
