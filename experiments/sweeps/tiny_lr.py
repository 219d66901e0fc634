"""Does the tiny model's loss after 20 steps depend on the learning rate more than on the seed?

Four tiny pretraining runs (lr 1e-3 and 3e-3, seeds 0 and 1), two at a time: about a minute on
2 CPU cores.
  python -m launch.sweep run experiments/sweeps/tiny_lr.py --workdir runs/tiny_lr --parallel 2
  python -m launch.sweep collect runs/tiny_lr --x train.lr --y train/loss,eval/loss --logx

Result: the learning rate matters, the seed barely: train/loss about 5.2 at lr 1e-3 and 4.1-4.2
at 3e-3 (from 6.2 at step 0), the two seeds within 0.07 of each other.
"""

from launch.sweep import grid

CONFIG = "experiments/pretrain.py:size=tiny"
# Short runs: a small batch, eval and checkpoint only at the end.
FIXED = {
    "train.steps": 20,
    "train.batch_size": 8,
    "train.seq_len": 64,
    "train.warmup_steps": 2,
    "train.log_every": 5,
    "train.eval_every": 20,
    "train.eval_batches": 1,
    "train.ckpt_every": 20,
}


def get_sweep():
    return grid({"train.lr": [1e-3, 3e-3], "seed": [0, 1]})
