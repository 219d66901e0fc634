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

import ml_collections as mlc

from experiments import common, dpo


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
    c = dpo.get_config(arg)  # DPO's model, mesh, data and train settings, then KTO's own
    del c.dpo
    c.stage = "kto"
    c.kto = kto_config()
    if c.model.size in common.CPU_SIZES:
        c.kto.update(k_max=4, kl_prompts=32, kl_prompt_len=32, kl_max_new_tokens=24)
    else:
        # The KTO paper's recipe: beta 0.1, lr 5e-7 (1e-6 is TRL's default), batch 32.
        c.train.update(batch_size=32, lr=5e-7)
    return c
