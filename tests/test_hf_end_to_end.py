"""End to end from a Hugging Face directory: a tiny random Qwen3 with a byte-level BPE
`tokenizer.json` and a Qwen chat template -> SFT on conversations -> RM on HH-RLHF transcript
pairs -> PPO-ptx -> export; transformers loads the export and, through `apply_chat_template`, its
greedy generation equals ours token for token.

Everything is built here (the model with transformers, the tokenizer with `tokenizers`:
tests/hf_tokenizers.py); nothing is downloaded. The stages run in-process on 2 devices with a few
steps each: the test is about the hand-offs (params, tokenizer, template, eos ids), not learning.
"""

import json
import os
import re
import socket

import jax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_tokenizers  # noqa: E402  (tests/ is on sys.path)

from experiments import ppo_ptx, rm, sft  # noqa: E402
from rlhf_jax.infra import mesh as mesh_lib  # noqa: E402
from rlhf_jax.infra import metrics  # noqa: E402
from rlhf_jax.sampling import load, sampler  # noqa: E402
from rlhf_jax.stages import lm, ppo  # noqa: E402
from rlhf_jax.stages import rm as rm_stage  # noqa: E402
from rlhf_jax.tools import convert  # noqa: E402

pytestmark = pytest.mark.slow  # three stages in-process and an export (about half a minute)

NEW_TOKENS = 8
FRUITS = ["apples", "pears", "plums", "figs"]


def _conversation(i: int) -> list[dict]:
    a, b = 2 + i % 5, 3 + i % 4
    turns = [
        {"role": "user", "content": f"Hello! what is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
    ]
    if i % 2:
        turns = [{"role": "system", "content": "Say hello to the user."}, *turns]
    if i % 3 == 0:
        turns += [
            {"role": "user", "content": f"and the {FRUITS[i % 4]}?"},
            {"role": "assistant", "content": f"I am fine, thank you: {a} {FRUITS[i % 4]}."},
        ]
    return turns


def _transcript(turns: list[dict]) -> str:
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[t['role']]}: {t['content']}" for t in turns)


def _write(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _hf_qwen3(directory: str) -> str:
    """A tiny random Qwen3ForCausalLM (tied embeddings, as Qwen3-0.6B) with a Qwen tokenizer."""
    hf_tokenizers.qwen(directory)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    cfg = transformers.Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).to(torch.float32)
    # Weights away from HF's init, so every tensor's mapping matters, and layers strong enough
    # that greedy decoding does not just repeat a token (as tied embeddings at init make it).
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((0.05 if "norm" in name or "embed" in name else 0.2) * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _data(root) -> dict:
    demos = [{"messages": _conversation(i)} for i in range(24)]
    pairs = []
    for i in range(16):
        turns = [t for t in _conversation(i) if t["role"] != "system"]
        good, context = turns[-1]["content"], turns[:-1]
        bad = "Hello Hello Hello." if i % 2 else "Go away."
        pairs.append(
            {
                "chosen": _transcript([*context, {"role": "assistant", "content": good}]),
                "rejected": _transcript([*context, {"role": "assistant", "content": bad}]),
            }
        )
    prompts = [{"messages": _conversation(i)[:-1]} for i in range(8)]
    text = [{"text": line} for line in hf_tokenizers.CORPUS[:5]]
    return {
        "demos": _write(root / "demos.jsonl", demos),
        "pairs": _write(root / "pairs.jsonl", pairs),
        "prompts": _write(root / "prompts.jsonl", prompts),
        "text": _write(root / "text.jsonl", text),
        "chat": _conversation(3)[:-1],  # system, user, assistant, user
    }


def _stages(root, hf_dir: str, data: dict, mesh, lora_rank: int = 0) -> dict:
    """SFT -> RM -> PPO-ptx from `hf:hf_dir`, each stage LoRA adapters of `lora_rank` (0: all
    params train)."""
    out = {k: str(root / k) for k in ("sft", "rm", "ppo")}
    s = sft.get_config()
    s.lora.rank = lora_rank
    s.init_from = f"hf:{hf_dir}"
    s.data.train = data["demos"]
    s.sft.eval_samples = 0
    s.train.update(
        epochs=0.0, steps=4, batch_size=8, seq_len=128, eval_every=0, ckpt_every=4, log_every=2
    )
    lm.run(s, mesh, out["sft"])

    r = rm.get_config()
    r.lora.rank = lora_rank
    r.init_from = out["sft"]
    r.data.train = data["pairs"]
    r.rm.norm_max = 8
    r.train.update(steps=2, batch_size=4, seq_len=128, eval_every=0, ckpt_every=2, log_every=1)
    rm_stage.run(r, mesh, out["rm"])

    p = ppo_ptx.get_config()
    p.lora.rank = lora_rank
    p.init_from = out["sft"]
    p.ppo.reward_from = out["rm"]
    p.data.train = data["prompts"]
    p.data.ptx = data["text"]
    p.data.eval_fraction = 0.0
    p.ppo.update(
        rollout_batch=4,
        minibatch=4,
        epochs=1,
        prompt_len=96,
        max_new_tokens=6,
        ptx_batch=2,
        ptx_seq_len=16,
        sample_rows=4,
    )
    p.train.update(steps=1, log_every=1, eval_every=0, ckpt_every=1)
    ppo.run(p, mesh, out["ppo"])
    return out


def _our_greedy(workdir: str, root, messages: list[dict], mesh):
    """(prompt ids, greedy response ids up to and including eos) of a conversation, as the
    generate tool builds and samples them (rlhf_jax/sampling/completions.py)."""
    path = _write(root / "chat.jsonl", [{"messages": messages}])
    graphdef, params, _, tok, meta = load.load_model(workdir, mesh)
    prompts, lines = load.read_prompts(path)
    template = meta["config"]["data"]["prompt_template"]
    ids = load.encode_prompts(prompts, lines, path, tok, template, None)[0]
    tokens, mask = load.left_pad([ids, ids], len(ids), tok.pad_id)  # one row per device
    sample = sampler.make_sampler(
        graphdef, max_new_tokens=NEW_TOKENS, eos_id=tok.eos_ids, pad_id=tok.pad_id, mesh=mesh
    )
    keys = load.row_keys(0, jax.numpy.arange(2), jax.numpy.zeros(2, int))
    got = jax.device_get(sample(params, tokens, mask, keys, greedy=True))
    return ids, got["response"][0, : got["lengths"][0]].tolist()


@pytest.fixture
def offline(monkeypatch):
    """Any network connection (a download by transformers, tokenizers or a stage) fails the test."""

    def refuse(sock, address, *args):
        if sock.family == socket.AF_UNIX:
            return real(sock, address)
        raise AssertionError(f"network access to {address!r} during the test")

    def lookup(host, *args, **kw):
        raise AssertionError(f"network lookup of {host!r} during the test")

    real = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)


def test_hf_qwen3_lora_sft_rm_ppo_export_generates_as_transformers(tmp_path, offline):
    """LoRA SFT -> LoRA RM -> LoRA PPO-ptx from a Qwen3 directory, exported merged.
    (Full-parameter stages from a Hugging Face model: test_pipeline_starts_from_an_hf_model.)"""
    hf_dir = _hf_qwen3(str(tmp_path / "qwen3"))
    data = _data(tmp_path)
    mesh = mesh_lib.build_mesh(sft.get_config().mesh, jax.devices()[:2])
    work = _stages(tmp_path, hf_dir, data, mesh, lora_rank=4)

    # The stages kept the model's tokenizer.json (not a trained sentencepiece) and its template.
    for stage in ("sft", "rm", "ppo"):
        assert os.path.isfile(os.path.join(work[stage], "tokenizer", "tokenizer.json")), stage
    rows = metrics.read_metrics(os.path.join(work["ppo"], "metrics.jsonl"))
    table = [r["ppo/samples"] for r in rows if "ppo/samples" in r]
    # Prompts are rendered by the model's template (the table shows repr()s, hence the \\n).
    assert table and r"<|im_start|>user\nHello!" in table[0]
    assert r"<|im_start|>assistant\n' ->" in table[0] and "User:" not in table[0]

    export = str(tmp_path / "export")
    convert.export_workdir(work["ppo"], export, mesh, sft.get_config().sharding.rules)
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    # The adapted projections (attention q/k/v/o and the MLP) are the trained policy's, merged;
    # everything else (embeddings, norms) is the frozen source model's, bit for bit.
    source = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ours_sd = model.state_dict()
    same = {n for n, p in source.state_dict().items() if torch.equal(p, ours_sd[n])}
    adapted = {n for n in ours_sd if re.search(r"(q|k|v|o|up|gate|down)_proj\.weight$", n)}
    assert adapted and not (adapted & same) and same == set(ours_sd) - adapted
    assert model.config.tie_word_embeddings
    prompt = hf_tok.apply_chat_template(
        data["chat"], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    with torch.no_grad():
        got = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=hf_tok.pad_token_id,
        )
    theirs = got[0, len(prompt) :].tolist()

    ours_prompt, ours = _our_greedy(work["ppo"], tmp_path, data["chat"], mesh)
    assert ours_prompt == prompt
    assert ours == theirs, (hf_tok.decode(ours), hf_tok.decode(theirs))


def test_pipeline_starts_from_an_hf_model(tmp_path, offline):
    """`config.init_from=hf:DIR`: the pipeline's pretrain step imports the model (no training),
    and its SFT step fine-tunes the import, with the model's own tokenizer, on the world's demos."""
    from experiments import pipeline as pipeline_exp
    from rlhf_jax import methods
    from rlhf_jax.infra import checkpoint
    from rlhf_jax.stages import pipeline

    hf_dir = _hf_qwen3(str(tmp_path / "hf"))
    c = pipeline_exp.get_config("size=tiny")
    c.init_from = f"hf:{hf_dir}"
    c.skip = ",".join(("collect", "rm", *methods.POLICY_METHODS, "evaluate"))
    c.rounds = 1
    c.world.sizes.update(pretrain=40, heldout=8, demos=32, rm_prompts=8, ppo_prompts=8)
    c.world.sizes.eval_prompts = 8
    c.stages.sft.sft.eval_samples = 0
    c.stages.sft.train.update(epochs=0.0, steps=2, batch_size=8, eval_every=0, log_every=1)
    run = tmp_path / "run"
    pipeline.run(c, mesh_lib.build_mesh(c.mesh, jax.devices()[:2]), str(run))
    imported = checkpoint.read_meta(str(run / "pretrain"))
    assert imported["stage"] == "import" and imported["config"]["hf"] == hf_dir
    assert not os.path.exists(run / "pretrain" / "metrics.jsonl")  # imported, not trained
    assert os.path.isfile(run / "pretrain" / "tokenizer" / "tokenizer.json")
    sft_meta = checkpoint.read_meta(str(run / "sft"))
    assert sft_meta["config"]["init_from"] == str(run / "pretrain")
    assert sft_meta["model"]["vocab_size"] == imported["model"]["vocab_size"]
    assert os.path.isfile(run / "sft" / "tokenizer" / "tokenizer.json")
    assert [r["step"] for r in metrics.read_metrics(str(run / "sft" / "metrics.jsonl"))][-1] == 2
    with pytest.raises(ValueError, match="takes hf:DIR"):
        c.init_from = str(tmp_path / "hf")
        pipeline.run(c, mesh_lib.build_mesh(c.mesh, jax.devices()[:2]), str(tmp_path / "bad"))
