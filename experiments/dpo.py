"""Direct preference optimisation: the SFT policy trained on the RM's comparisons, no RM, no RL.

A K-way ranking is used whole: all its ranked pairs are one batch element weighted as the RM
loss weighs them (Rafailov et al. 2023 for the pairwise loss; `dpo.loss=plackett_luce` is the
listwise form of the paper's appendix, `ipo` is Azar et al. 2023, `dpo.label_smoothing` > 0 is
conservative DPO). The frozen reference is the SFT model (rlhf_jax/stages/dpo.py).

Tiny model, CPU, after experiments/{pretrain,sft}.py, on the comparisons experiments/rm.py reads
(about a minute on 2 cores; measured: eval/loss 0.693 -> 0.54, eval/accuracy 0.85 on the
held-out comparisons, eval/kl about 1 nat per response):
  python -m launch.run --config experiments/dpo.py --workdir runs/dpo_tiny \
      --config.init_from=runs/sft_tiny

Listwise, stronger KL anchor (eval/accuracy 0.84 at eval/kl 0.36):
  python -m launch.run --config experiments/dpo.py --workdir runs/dpo_pl_tiny \
      --config.init_from=runs/sft_tiny --config.dpo.loss=plackett_luce --config.dpo.beta=0.3

Your own comparisons (K-way {"prompt", "responses", "ranking"} or {"prompt", "chosen",
"rejected"} JSONL, or any form the RM reads), GPT-2 124M:
  python -m launch.run --config experiments/dpo.py:size=small --workdir runs/dpo_small \
      --config.init_from=runs/sft_small --config.data.train=comparisons.jsonl

Read `metrics.jsonl`: `dpo/loss` starts at log 2 = 0.693 for pairs (policy = reference; log K!
per prompt with plackett_luce), `eval/accuracy` is the held-out implicit-reward accuracy and
`eval/kl` the policy's KL to the SFT model on held-out prompts, in nats per response.

Args (after the colon): size, family, fsdp, tensor. The architecture comes from init_from.
"""

import os

import ml_collections as mlc

from experiments import common

HERE = os.path.dirname(os.path.abspath(__file__))


def dpo_config() -> mlc.ConfigDict:
    return mlc.ConfigDict(
        dict(
            beta=0.1,  # KL coefficient of the implicit reward (DPO paper); IPO's tau
            loss="sigmoid",  # sigmoid (DPO) | ipo | plackett_luce (listwise) | simpo
            simpo_gamma=0.0,  # SimPO's target reward margin (experiments/simpo.py sets it)
            label_smoothing=0.0,  # conservative DPO: assumed fraction of flipped labels
            reference_from="",  # frozen reference workdir; "" -> init_from (the SFT policy)
            k_max=9,  # responses per prompt at most (InstructGPT: 4 to 9)
            kl_prompts=64,  # held-out prompts for eval/kl; 0 disables it
            kl_prompt_len=64,  # prompts left-padded / cut (from the left) to this
            kl_max_new_tokens=64,
        )
    )


def get_config(arg=None):
    arg = common.parse_arg(arg, size="tiny", family="", fsdp=1, tensor=1)
    c = common.stage_config("dpo", arg)
    c.dpo = dpo_config()
    c.data.train = os.path.join(HERE, "data", "tiny_comparisons.jsonl")
    c.data.eval_fraction = 0.1
    if arg.size in common.CPU_SIZES:
        c.model.dtype = "float32"  # CPU
        c.train.update(
            steps=100,
            batch_size=16,
            seq_len=64,
            lr=1e-4,
            warmup_steps=10,
            weight_decay=0.0,
            log_every=10,
            eval_every=50,
            eval_batches=0,
            ckpt_every=50,
        )
        c.dpo.update(k_max=4, kl_prompts=32, kl_prompt_len=32, kl_max_new_tokens=24)
    else:
        # The DPO paper: beta 0.1, lr 1e-6 with warm-up, batch 64, no decay.
        c.train.update(
            steps=2000,
            batch_size=64,
            seq_len=1024,
            lr=1e-6,
            warmup_steps=150,
            min_lr_ratio=1.0,
            weight_decay=0.0,
            log_every=10,
            eval_every=200,
            eval_batches=0,
            ckpt_every=500,
        )
    return c
