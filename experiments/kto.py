"""KTO (Ethayarajh et al. 2024): the SFT policy trained on unpaired good / bad completions.

Data: `{"prompt", "completion", "label"}` JSONL rows (label true = desirable), or comparisons
in any form the RM reads, converted: each comparison's best-ranked responses are desirable and
its worst-ranked undesirable (data/kto_data.py). The loss is rl/kto.py's, with the reference
point z0 (a KL estimate from mismatched prompt/completion pairs of the batch), the frozen
reference the SFT model (rlhf_jax/stages/kto.py).

Tiny model, CPU, after experiments/{pretrain,sft}.py, on the comparisons experiments/rm.py reads
(about a minute on 2 cores):
  python -m launch.run --config experiments/kto.py --workdir runs/kto_tiny \
      --config.init_from=runs/sft_tiny

Your own unpaired data, GPT-2 124M:
  python -m launch.run --config experiments/kto.py:size=small --workdir runs/kto_small \
      --config.init_from=runs/sft_small --config.data.train=kto_rows.jsonl

Read `metrics.jsonl`: `kto/loss` starts at (lambda_D n_D + lambda_U n_U) / (2 n) (= 0.5 with unit
weights: every value is sigmoid(0) at the reference), `kto/z0` the batch KL estimate,
`eval/accuracy` the held-out rows on their label's side of z0, `eval/kl` the KL to SFT.

Args (after the colon): size, family, fsdp, tensor. The architecture comes from init_from.
"""

import os

import ml_collections as mlc

from experiments import common

HERE = os.path.dirname(os.path.abspath(__file__))


def kto_config() -> mlc.ConfigDict:
    return mlc.ConfigDict(
        dict(
            beta=0.1,  # KL coefficient (the paper's and TRL's default)
            desirable_weight=1.0,  # lambda_D
            undesirable_weight=1.0,  # lambda_U
            reference_from="",  # frozen reference workdir; "" -> init_from (the SFT policy)
            k_max=9,  # responses per comparison at most, when reading comparisons
            kl_prompts=64,  # held-out prompts for eval/kl; 0 disables it
            kl_prompt_len=64,
            kl_max_new_tokens=64,
        )
    )


def get_config(arg=None):
    arg = common.parse_arg(arg, size="tiny", family="", fsdp=1, tensor=1)
    c = common.stage_config("kto", arg)
    c.kto = kto_config()
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
        c.kto.update(k_max=4, kl_prompts=32, kl_prompt_len=32, kl_max_new_tokens=24)
    else:
        # The KTO paper's recipe: beta 0.1, lr 5e-7 (1e-6 is TRL's default), batch 32.
        c.train.update(
            steps=2000,
            batch_size=32,
            seq_len=1024,
            lr=5e-7,
            warmup_steps=150,
            min_lr_ratio=1.0,
            weight_decay=0.0,
            log_every=10,
            eval_every=200,
            eval_batches=0,
            ckpt_every=500,
        )
    return c
