"""The method table: every way this codebase trains or compares a model, in one place.

The entry (`launch/run.py`) dispatches `config.stage` through `STAGES`; the pipeline
(stages/pipeline.py) runs the rows whose `data` says how to feed them, in round 1 and, for rows
with `rounds=True`, in every later round; the report (task/report*.py) takes labels, summary
keys and plot styles from here; the planner (stages/aot.py) plans `config.stage` through
`STAGES` too; the tests read the same lists. This module imports nothing of the project (stage
modules are named by string and imported on use, big_vision style), so any layer may read it.

Adding a method (README "Adding a method"): its loss (rl/), its stage or a variant of one
(stages/), its experiment config (experiments/), a row here, and its tests.
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the table.

    key: the pipeline step, its sub-directory of the run and the report's model key.
    label: how tables and plots name it.
    stage: the `config.stage` of its runs (several methods may share one stage: SimPO is the
      DPO stage with `dpo.loss="simpo"`).
    config_key: its stage config under the pipeline's `config.stages` (default: key; PPO-ptx
      shares PPO's, `ppo`).
    section: the config section of its own keys, `config.<section>` (default: its stage's name:
      SimPO's keys are `dpo.*`).
    data: what the pipeline feeds it: "prompts" (prompts plus the round's reward model),
      "comparisons" (the round's labelled comparisons) or "" (not a policy-training method).
    ptx: the pipeline sets its pretraining-data term (`<section>.ptx_coef`, `data.ptx`); None
      for methods without one, else the coefficient: "pipeline" for the pipeline's `ptx_coef`,
      or a number (PPO's 0).
    reference: the pipeline sets `<section>.reference_from` to the SFT model (the KL anchor);
      False for methods without a reference model.
    rounds: it iterates in pipeline rounds >= 2 (`config.iterate.methods`): an RM-fed method
      continues from its own previous-round policy on the round's new RM; a comparison-fed one
      trains on comparisons collected from its own previous-round policy (online DPO).
    summary: the training metrics the report summarises for it.
    style: (matplotlib colour, marker) in the report's plots.
    experiment: its experiment config, for the README and the planner.
    """

    key: str
    label: str
    stage: str
    config_key: str = ""
    section: str = ""
    data: str = ""
    ptx: object = None
    reference: bool = True
    rounds: bool = False
    summary: tuple[str, ...] = ()
    style: tuple[str, str] = ("tab:gray", "o")
    experiment: str = ""

    @property
    def stage_config(self) -> str:
        return self.config_key or self.key

    @property
    def keys(self) -> str:
        return self.section or self.stage


# config.stage -> the module whose run(config, mesh, workdir) trains it. The planner maps the
# same names to its planning functions (stages/aot.py PLANNERS).
STAGES = {
    "pretrain": "rlhf_jax.stages.lm",
    "sft": "rlhf_jax.stages.lm",
    "rm": "rlhf_jax.stages.rm",
    "ppo": "rlhf_jax.stages.ppo",
    "rsft": "rlhf_jax.stages.rsft",
    "dpo": "rlhf_jax.stages.dpo",
    "kto": "rlhf_jax.stages.kto",
    "grpo": "rlhf_jax.stages.grpo",
    "pipeline": "rlhf_jax.stages.pipeline",
}

# In pipeline order. The first three are the InstructGPT steps every method starts from; the
# rest are the policy-training methods compared in the report.
METHODS = (
    Method("pretrained", "Pretrained", "pretrain", config_key="pretrain", style=("black", "X"),
           experiment="experiments/pretrain.py"),
    Method("sft", "SFT", "sft", style=("tab:gray", "s"), experiment="experiments/sft.py"),
    Method("rm", "Reward model", "rm", experiment="experiments/rm.py"),
    Method("ppo", "PPO", "ppo", data="prompts", ptx=0.0, rounds=True,
           summary=("ppo/score", "eval/score", "ppo/kl_per_seq"), style=("tab:blue", "o"),
           experiment="experiments/ppo_ptx.py"),
    Method("ppo_ptx", "PPO-ptx", "ppo", config_key="ppo", data="prompts", ptx="pipeline",
           rounds=True, summary=("ppo/score", "eval/score", "ppo/kl_per_seq", "ppo/ptx_loss"),
           style=("tab:orange", "^"), experiment="experiments/ppo_ptx.py"),
    Method("rsft", "Best-of-K fine-tuning", "rsft", data="prompts", reference=False,
           summary=("rsft/selected_score", "rsft/candidate_score", "rsft/kept_fraction"),
           style=("tab:green", "D"), experiment="experiments/rsft.py"),
    Method("dpo", "DPO", "dpo", data="comparisons", rounds=True,
           summary=("dpo/loss", "eval/accuracy", "eval/kl"), style=("tab:red", "P"),
           experiment="experiments/dpo.py"),
    Method("simpo", "SimPO", "dpo", data="comparisons", reference=False,
           summary=("dpo/loss", "eval/accuracy", "eval/kl"), style=("tab:pink", "h"),
           experiment="experiments/simpo.py"),
    Method("kto", "KTO", "kto", data="comparisons",
           summary=("kto/loss", "eval/accuracy", "eval/kl"), style=("tab:olive", "<"),
           experiment="experiments/kto.py"),
    Method("grpo", "GRPO-ptx", "grpo", data="prompts", ptx="pipeline",
           summary=("grpo/score", "eval/score", "grpo/kl_per_seq", "grpo/ptx_loss"),
           style=("tab:brown", "*"), experiment="experiments/grpo.py"),
)  # fmt: skip

BY_KEY = {m.key: m for m in METHODS}
# The policy-training methods the pipeline runs after the reward model, in order.
POLICY_METHODS = tuple(m.key for m in METHODS if m.data)
# Report-only rows: best-of-K sampling is a decoding baseline, not a trained model.
BEST_OF_K = Method("best_of_k", "Best-of-K sampling", "", style=("tab:purple", "v"))


def method(key: str) -> Method:
    """The row of `key` (a round-r key `dpo_r2` names its method `dpo`)."""
    if key in BY_KEY:
        return BY_KEY[key]
    if key == BEST_OF_K.key:
        return BEST_OF_K
    base, _, r = key.rpartition("_r")
    if base in BY_KEY and r.isdigit():
        return BY_KEY[base]
    raise ValueError(f"unknown method: {key!r}; expected one of {[m.key for m in METHODS]}")


def stage_module(stage: str):
    """The module that runs `config.stage`."""
    if stage not in STAGES:
        raise ValueError(f"unknown config.stage: {stage!r}; expected one of {tuple(STAGES)}")
    return importlib.import_module(STAGES[stage])
