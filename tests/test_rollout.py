"""The rollout switch (sampling/rollout.py): `config.rollout.engine` picks the static sampler or the
paged engine, an unknown name is one sentence, and a GRPO stage run through the engine samples
the static sampler's tokens and logs its metrics (within float tolerance: two compiled programs).
"""

import numpy as np
import pytest
import test_grpo_stage

from rlhf_jax.infra import metrics, sharding
from rlhf_jax.sampling import engine, rollout, sampler
from rlhf_jax.stages import grpo as grpo_stage


def test_make_dispatches_on_config_rollout_engine(monkeypatch):
    calls = []
    monkeypatch.setattr(sampler, "make_sampler", lambda g, **kw: calls.append(("static", kw)))
    monkeypatch.setattr(engine, "make_engine", lambda g, **kw: calls.append(("paged", kw)))
    kw = dict(max_new_tokens=5, eos_id=2, pad_id=0, mesh=None, rules=None)
    rollout.make("graphdef", None, **kw)
    rollout.make("graphdef", dict(engine="static", slots=8), **kw)
    rollout.make("graphdef", dict(engine="paged"), **kw)
    rollout.make("graphdef", dict(engine="paged", slots=8, page_size=4, pages=32), **kw)
    assert calls == [
        ("static", kw),
        ("static", kw),
        ("paged", kw | dict(num_slots=None, page_size=16, num_pages=None)),
        ("paged", kw | dict(num_slots=8, page_size=4, num_pages=32)),
    ]
    with pytest.raises(ValueError, match=r"^unknown config.rollout.engine: 'vllm'; expected"):
        rollout.make("graphdef", dict(engine="vllm"), **kw)


@pytest.mark.slow
def test_grpo_through_the_engine_equals_static(tmp_path, monkeypatch):
    root = test_grpo_stage.write_init_dir(tmp_path)
    real_make = rollout.make
    runs = {}

    def recording_make(*args, **kw):
        sample = real_make(*args, **kw)

        def wrapped(*a, **k):
            out = sample(*a, **k)
            runs[-1].append(sharding.to_host(out["tokens"]))
            return out

        return wrapped

    monkeypatch.setattr(rollout, "make", recording_make)
    for name in ("static", "paged"):
        config = test_grpo_stage.grpo_config(root)
        config.train.update(steps=2, ckpt_every=100, eval_every=2)
        config.rollout.engine = name
        runs[-1] = []
        test_grpo_stage.run(config, root / name)
        runs[name] = runs.pop(-1)
        assert grpo_stage.rollout is rollout  # the stage samples through the switch
    assert len(runs["static"]) == len(runs["paged"]) > 0
    for a, b in zip(runs["static"], runs["paged"], strict=True):
        np.testing.assert_array_equal(a, b)  # the sampled tokens, exactly
    rows = {n: metrics.read_metrics(str(root / n / "metrics.jsonl")) for n in ("static", "paged")}
    assert len(rows["static"]) == len(rows["paged"])
    for a, b in zip(rows["static"], rows["paged"], strict=True):
        assert a.keys() == b.keys()
        for k, v in a.items():
            timing = any(w in k for w in ("time", "/s", "sec", "mfu"))  # wall clock, not results
            if isinstance(v, float) and not timing:
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
