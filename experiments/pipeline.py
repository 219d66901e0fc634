"""The whole InstructGPT pipeline on the bundled task world (rlhf_jax/world.py), with a report.

  python -m launch.run --config experiments/pipeline.py --workdir runs/pipeline

world -> pretrain -> SFT -> comparison collection (K samples per prompt from the SFT policy,
ranked by a simulated labeler) -> RM -> PPO and PPO-ptx -> evaluation (gold score = the
labeler's noiseless utility, held-out pretraining loss) -> runs/pipeline/report.md.
Tiny models on a 2-core CPU: see the README for the measured time and results.

Every stage's full config lives under `stages.<name>` and can be overridden, e.g.
`--config.stages.ppo.ppo.beta=0.05 --config.stages.rm.train.steps=300`. `seed` seeds the world,
every stage and the labeler. Args (after the colon): size (tiny|small|...), family.
"""

from experiments import common, ppo_ptx, pretrain, rm, sft


def get_config(arg=None):
    arg = common.parse_arg(arg, size="tiny", family="")
    structural = f"size={arg.size},family={arg.family}"
    c = common.base_config()
    c.stage = "pipeline"
    c.ptx_coef = 27.8  # gamma of the PPO-ptx run (the PPO run uses 0)
    c.world = dict(
        sizes=dict(
            pretrain_docs=6000,
            heldout_docs=300,
            demos=3000,
            rm_prompts=600,
            ppo_prompts=2000,
            eval_prompts=200,
        ),
    )
    c.collect = dict(k=4, temperature=1.0, max_new_tokens=24, labeler_noise=0.1)
    c.evaluate = dict(temperature=0.0, max_new_tokens=24, seq_len=64, samples=4)
    c.stages = dict(
        pretrain=pretrain.get_config(structural),
        sft=sft.get_config(structural),
        rm=rm.get_config(structural),
        ppo=ppo_ptx.get_config(structural),
    )
    if arg.size == "tiny":
        c.stages.pretrain.train.update(
            steps=600, batch_size=32, seq_len=64, eval_every=200, ckpt_every=200
        )
        c.stages.sft.train.update(epochs=2.0, eval_every=100, ckpt_every=100)
        c.stages.rm.train.update(steps=200, eval_every=50, ckpt_every=100)
        c.stages.ppo.train.update(steps=40, log_every=10, ckpt_every=20)
    return c
