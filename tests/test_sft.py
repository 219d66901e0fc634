"""SFT: response-only loss mask, and fine-tuning a pretrained tiny model lowers held-out loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import pretrain, sft
from rlhf_jax.data import lm_data, sft_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import metrics
from rlhf_jax.models import config as model_config
from rlhf_jax.models import transformer as M
from rlhf_jax.rl import losses
from rlhf_jax.stages import lm

TEMPLATE = "User: {prompt}\nAssistant: "


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    docs = lm_data.read_documents(pretrain.get_config().data.train)
    return tok_lib.Tokenizer.load(tok_lib.train_tokenizer(docs, path, 512))


DEMOS = [
    {"prompt": "what is 2 plus 3?", "response": "2 plus 3 is 5."},
    {"prompt": "alice has 4 pens and gets 1 more. how many pens now?", "response": "alice has 5."},
]


def test_mask_covers_exactly_the_response_and_eos(tok):
    ex, cut = sft_data.encode_demos(DEMOS, tok, TEMPLATE, seq_len=48)
    assert cut == 0
    for i, d in enumerate(DEMOS):
        m = ex["mask"][i].astype(bool)
        # Naive reference: the masked targets are the response tokens then EOS.
        assert list(ex["targets"][i][m]) == tok.encode(d["response"]) + [tok.eos_id]
        # ... and the unmasked real inputs are exactly the prompt prefix.
        prompt = [tok.bos_id] + tok.encode(TEMPLATE.replace("{prompt}", d["prompt"]))
        assert list(ex["inputs"][i][: len(prompt)]) == prompt
        assert not m[: len(prompt) - 1].any() and m[len(prompt) - 1]


def test_prompt_targets_do_not_move_the_loss(tok):
    ex, _ = sft_data.encode_demos(DEMOS, tok, TEMPLATE, seq_len=48)
    model = M.build(model_config.preset("tiny", dtype="float32"), seed=0)
    logits, _ = jax.jit(lambda x: model(x))(jnp.asarray(ex["inputs"]))
    base = losses.masked_xent(logits, jnp.asarray(ex["targets"]), jnp.asarray(ex["mask"]))
    rng = np.random.default_rng(0)
    noisy = np.where(ex["mask"] > 0, ex["targets"], rng.integers(0, 512, ex["targets"].shape))
    moved = losses.masked_xent(logits, jnp.asarray(noisy), jnp.asarray(ex["mask"]))
    np.testing.assert_array_equal(np.asarray(base), np.asarray(moved))
    # Changing a response target does move it (the test can fail).
    resp = np.where(ex["mask"] > 0, (ex["targets"] + 1) % 512, ex["targets"])
    assert float(
        losses.masked_xent(logits, jnp.asarray(resp), jnp.asarray(ex["mask"]))[0]
    ) != float(base[0])


def test_long_examples_are_cut_and_counted(tok):
    long = [{"prompt": "hi", "response": "one two three four " * 20}]
    ex, cut = sft_data.encode_demos(long, tok, TEMPLATE, seq_len=48)
    assert cut == 1 and ex["mask"][0].sum() > 0
    with pytest.raises(ValueError, match="prompt alone"):
        sft_data.encode_demos([{"prompt": "x " * 60, "response": "y"}], tok, TEMPLATE, 48)


def test_malformed_demo_line_names_file_and_line(tmp_path):
    f = tmp_path / "demos.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"demos.jsonl:2.*'response'"):
        sft_data.read_demos(str(f))


@pytest.mark.slow
def test_sft_from_pretrained_lowers_heldout_loss(tmp_path, tok):
    mesh = mesh_lib.build_mesh(pretrain.get_config().mesh)
    pre = pretrain.get_config()
    pre.tokenizer.path = tok.path
    pre.train.update(
        steps=60,
        batch_size=8,
        seq_len=64,
        eval_every=0,
        ckpt_every=60,
        log_every=20,
        warmup_steps=5,
    )
    lm.run(pre, mesh, str(tmp_path / "pre"))

    c = sft.get_config()
    c.init_from = str(tmp_path / "pre")
    c.sft.eval_samples = 2
    c.train.update(
        epochs=0.0,
        steps=40,
        batch_size=8,
        eval_every=40,
        log_every=20,
        ckpt_every=40,
        eval_batches=4,
    )
    lm.run(c, mesh, str(tmp_path / "sft"))
    rows = metrics.read_metrics(str(tmp_path / "sft" / "metrics.jsonl"))
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 2 and evals[-1] < 0.7 * evals[0]  # step 0 (pretrained) vs step 40
    samples = [r for r in rows if "eval/samples" in r]
    assert samples and "sample:" in samples[-1]["eval/samples"]
