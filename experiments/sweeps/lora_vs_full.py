"""LoRA against full fine-tuning on the bundled task: SFT, RM, DPO and PPO-ptx, three seeds.

Each point is the pipeline (world -> pretrain -> SFT -> comparisons -> RM -> PPO-ptx and DPO ->
evaluation), one round, with every stage after pretraining trained either on all its params
(`lora.rank=0`) or as LoRA adapters (`lora.rank=16` on attention q/k/v/o and the MLP, the
pipeline's `lora` section handed to each stage: `stages/pipeline.stage_config`). Same learning
rates and steps for both. The pipeline's evaluation gives each point's gold score, KL from its
own SFT model and held-out pretraining loss (the alignment tax); `timings.json` the wall time of
every stage.

  python -m launch.sweep run experiments/sweeps/lora_vs_full.py --workdir runs/lora_vs_full
  python -m launch.sweep collect runs/lora_vs_full --x rank \\
      --y eval.models.sft.gold_score,eval.models.ppo_ptx.gold_score,eval.models.dpo.gold_score
"""

from launch.sweep import grid

CONFIG = "experiments/pipeline.py"
FIXED = {
    "skip": "ppo,rsft,simpo,kto,grpo",  # SFT, RM, PPO-ptx and DPO
    "rounds": 1,
    "evaluate.best_of_k": 0,
}


def get_sweep():
    return grid({"lora.rank": [0, 16], "seed": [0, 1, 2]})
