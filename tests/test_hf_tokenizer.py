"""data/hf_tokenizer.py: tokenizer.json models behind the stages' tokenizer interface.

Special ids (bos as the model adds it, eos lists, pad or none) against what transformers loads
from the same files; the one load_tokenizer dispatch; the prompt/response boundary rule for both
backends through SFT, RM and PPO-prompt encoding; one-line errors naming the file; a stage's
workdir copy. Tokenizers are built locally (tests/hf_tokenizers.py).
"""

import json
import os

import hf_tokenizers as build
import ml_collections
import pytest

from rlhf_jax.data import hf_tokenizer, lm_data, rm_data, sft_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.sampling import load
from rlhf_jax.stages import setup

transformers = pytest.importorskip("transformers")
TEMPLATE = sft_data.PROMPT_TEMPLATE  # "User: {prompt}\nAssistant: "


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama3": build.llama3(str(root / "llama3")),
        "qwen": build.qwen(str(root / "qwen")),
        "gpt2": build.gpt2(str(root / "gpt2")),
    }


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sp") / "tok.model")
    return tok_lib.Tokenizer.load(tok_lib.train_tokenizer(build.CORPUS * 4, path, 400))


def hf_ref(directory):
    return transformers.AutoTokenizer.from_pretrained(directory)


def test_special_ids_come_from_the_models_files(dirs):
    llama = tok_lib.load_tokenizer(dirs["llama3"])
    ref = hf_ref(dirs["llama3"])
    eot, end = ref.convert_tokens_to_ids("<|eot_id|>"), ref.convert_tokens_to_ids("<|end_of_text|>")
    assert isinstance(llama, hf_tokenizer.HFTokenizer)
    # eos_token first, then generation_config.json's list; the sampler stops at any of them.
    assert llama.eos_id == eot == ref.eos_token_id and llama.eos_ids == (eot, end)
    assert llama.bos_id == ref.bos_token_id and llama.add_bos  # its post-processor adds it
    assert ref("hi")["input_ids"][0] == llama.bos_id
    assert not llama.has_pad and llama.pad_id == llama.eos_id  # no pad: eos fills
    assert llama.vocab_size == len(ref)

    qwen = tok_lib.load_tokenizer(dirs["qwen"])
    ref = hf_ref(dirs["qwen"])
    assert qwen.eos_id == ref.eos_token_id and qwen.pad_id == ref.pad_token_id and qwen.has_pad
    assert qwen.eos_ids == (ref.eos_token_id, ref.convert_tokens_to_ids("<|endoftext|>"))
    assert ref.bos_token is None and not qwen.add_bos  # Qwen has no bos
    assert ref("hi")["input_ids"] == qwen.encode("hi")

    gpt2 = tok_lib.load_tokenizer(os.path.join(dirs["gpt2"], "tokenizer.json"))  # the file
    ref = hf_ref(dirs["gpt2"])
    assert gpt2.bos_id == gpt2.eos_id == ref.eos_token_id and gpt2.eos_ids == (gpt2.eos_id,)
    assert not gpt2.add_bos and ref("hi")["input_ids"] == gpt2.encode("hi")


def test_one_dispatch_for_both_backends(dirs, sp):
    """A .model file is sentencepiece, with the answers foreign models vary in fixed."""
    tok = tok_lib.load_tokenizer(sp.path)
    assert type(tok) is tok_lib.Tokenizer and tok.eos_ids == (tok_lib.EOS_ID,) and tok.add_bos
    assert tok.model_template is None and tok.has_pad and tok.WORKDIR_NAME == "tokenizer.model"
    hf = tok_lib.load_tokenizer(dirs["qwen"])
    assert type(hf) is hf_tokenizer.HFTokenizer and hf.WORKDIR_NAME == "tokenizer"
    assert hf.fingerprint() != tok_lib.load_tokenizer(dirs["llama3"]).fingerprint()


def test_encode_decode_match_transformers(dirs):
    tok, ref = tok_lib.load_tokenizer(dirs["llama3"]), hf_ref(dirs["llama3"])
    for text in build.CORPUS[:5] + ["unseen: ©∑ 😀 <b>x</b>", "a<|eot_id|>b"]:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"]
        assert tok.encode_batch([text, text]) == [ids, ids]
        assert tok.decode(ids) == text.replace("<|eot_id|>", "")  # eos decodes to nothing
    header = tok.piece_id("<|start_header_id|>")
    assert tok.decode([tok.bos_id, header, *tok.encode("x"), tok.eos_id, tok.pad_id]) == (
        "<|start_header_id|>x"  # bos/eos/pad dropped, other special tokens kept
    )
    assert tok.decode([*tok.encode("ok"), tok.vocab_size + 5]) == "ok"  # padded embedding rows
    assert tok.piece_id("no such piece") is None
    assert tok.id_to_piece(header) == "<|start_header_id|>"
    tok.check_model_vocab(tok.vocab_size)
    with pytest.raises(ValueError, match="model.vocab_size"):
        tok.check_model_vocab(tok.vocab_size - 1)


def test_overrides_and_fallbacks(dirs, tmp_path):
    """add_bos_token in tokenizer_config.json wins over the post-processor; an eos only in
    generation_config.json is found; a model naming no eos at all is one clear line."""
    d = str(tmp_path / "llama")
    build.llama3(d)
    cfg_file = os.path.join(d, "tokenizer_config.json")
    cfg = _read(cfg_file)
    _write(cfg_file, {**cfg, "add_bos_token": False})
    assert not tok_lib.load_tokenizer(d).add_bos

    del cfg["eos_token"]
    _write(cfg_file, cfg)
    tok = tok_lib.load_tokenizer(d)
    end = tok.piece_id("<|end_of_text|>")
    assert tok.eos_id == end and tok.eos_ids == (end, tok.piece_id("<|eot_id|>"))
    os.remove(os.path.join(d, "generation_config.json"))
    with pytest.raises(ValueError, match="names no eos token"):
        tok_lib.load_tokenizer(d)


def test_bad_files_are_one_line_naming_the_file(dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        tok_lib.load_tokenizer(str(tmp_path))  # an empty directory
    d = str(tmp_path / "q")
    build.qwen(d)
    cfg_file = os.path.join(d, "tokenizer_config.json")
    _write(cfg_file, {**_read(cfg_file), "eos_token": "<|nope|>"})
    with pytest.raises(ValueError) as e:
        tok_lib.load_tokenizer(d)
    assert cfg_file in str(e.value) and "eos_token '<|nope|>'" in str(e.value)
    assert "\n" not in str(e.value)
    _write(cfg_file, "{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        tok_lib.load_tokenizer(d)
    _write(os.path.join(d, "tokenizer.json"), {})
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a valid tokenizer\.json"):
        tok_lib.load_tokenizer(d)


@pytest.mark.parametrize("backend", ["sentencepiece", "gpt2", "llama3"])
def test_prompt_and_response_are_encoded_apart_in_every_stage(backend, dirs, sp):
    """The boundary rule: prompt_ids(prompt) + encode(response) + [eos], the same ids in SFT
    demonstrations, RM sequences (both encoders) and PPO's prompts; decoding gives the text back."""
    tok = sp if backend == "sentencepiece" else tok_lib.load_tokenizer(dirs[backend])
    prompt, response = "what is 7 plus 5?", "Hello there, 12."
    text = TEMPLATE.replace("{prompt}", prompt)
    bos = [tok.bos_id] if tok.add_bos else []
    p = bos + tok.encode(text)
    r = tok.encode(response) + [tok.eos_id]

    ids, train = sft_data.demo_ids(tok, TEMPLATE, {"prompt": prompt, "response": response})
    assert ids == p + r and train == [0] * len(p) + [1] * len(r)
    assert tok.decode(ids) == text + response  # bos/eos decode to nothing
    ppo = sft_data.encode_prompts([prompt], tok, TEMPLATE, prompt_len=len(p) + 3)[0]
    assert ppo["tokens"][0, 3:].tolist() == p and not ppo["mask"][0, :3].any()
    seqs, mask = sft_data.encode_sequences([(prompt, response)], tok, TEMPLATE, seq_len=64)
    assert seqs[0, : mask[0].sum()].tolist() == p + r
    comp = {"prompt": prompt, "responses": [response, "No."], "ranks": [0, 1]}
    ex, _ = rm_data.encode_comparisons([comp], tok, TEMPLATE, seq_len=64, k_max=2)
    assert ex["tokens"][0, 0, : ex["mask"][0, 0].sum()].tolist() == p + r


def test_byte_level_bpe_would_merge_across_the_boundary(dirs):
    """Why the rule matters: encoded whole, GPT-2-style BPE joins the template's trailing space
    with the response's first word; the stages never make that merge."""
    tok = tok_lib.load_tokenizer(dirs["gpt2"])
    text = TEMPLATE.replace("{prompt}", "hi")
    whole = tok.encode(text + "Hello")
    apart = tok.encode(text) + tok.encode("Hello")
    assert whole != apart and tok.piece_id("ĠHello") in whole
    assert tok.decode(whole) == tok.decode(apart) == text + "Hello"
    ids, _ = sft_data.demo_ids(tok, TEMPLATE, {"prompt": "hi", "response": "Hello"})
    assert ids == apart + [tok.eos_id]


def test_stage_setup_keeps_a_copy_and_reads_hf_dirs(dirs, tmp_path):
    """config.tokenizer.path = a tokenizer.json directory, and init_from = hf:DIR without a
    tokenizer.model: the workdir keeps `tokenizer/`, reloaded with the same ids and template."""
    src = tok_lib.load_tokenizer(dirs["llama3"])
    for i, (path, init) in enumerate([(dirs["llama3"], ""), ("", "hf:" + dirs["llama3"])]):
        c = ml_collections.ConfigDict({"stage": "sft", "init_from": init, "seed": 0})
        c.tokenizer = {"path": path}
        work = str(tmp_path / f"w{i}")
        tok = setup.load_tokenizer(c, work)
        assert os.path.isdir(os.path.join(work, "tokenizer")) and tok.WORKDIR_NAME == "tokenizer"
        assert tok.eos_ids == src.eos_ids and tok.bos_id == src.bos_id and tok.add_bos
        assert tok.encode("Hello world") == src.encode("Hello world")
        assert tok.model_template is not None
        assert _read(os.path.join(work, "tokenizer", "generation_config.json"))
    # Tools find the copy from the checkpoint's meta (also a meta naming the default file).
    os.makedirs(os.path.join(work, "checkpoints"))
    for named in ("tokenizer", "tokenizer.model"):
        found = load._tokenizer_path(work, {"tokenizer": named})
        assert found == os.path.join(work, "tokenizer")
    # The next stage hands on from that workdir.
    c = ml_collections.ConfigDict({"stage": "rm", "init_from": work, "seed": 0})
    c.tokenizer = {"path": ""}
    assert setup.load_tokenizer(c, str(tmp_path / "next")).eos_ids == src.eos_ids


def test_token_cache_and_packing_follow_the_model(dirs, tmp_path):
    tok = tok_lib.load_tokenizer(dirs["qwen"])  # no bos: documents are framed doc + [eos]
    cache = str(tmp_path / "c.npz")
    docs = build.CORPUS[:3]
    first = lm_data.tokenize_documents(docs, tok, cache_path=cache)
    assert lm_data.tokenize_documents(docs, tok, cache_path=cache) == first
    assert first == tok.encode_batch(docs)
    # One-token windows: one train sequence per stream token, so a bos per document would show.
    _, _, info = lm_data.build_text_data(
        [_jsonl(tmp_path, docs)], tok, seq_len=1, batch_size=1, eval_fraction=0.0, seed=0
    )
    assert info["train_sequences"] == sum(len(d) + 1 for d in first)  # doc + [eos], no bos


def _jsonl(tmp_path, docs):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def _read(path):
    with open(path) as f:
        return json.load(f)


def _write(path, value):
    with open(path, "w") as f:
        f.write(value if isinstance(value, str) else json.dumps(value))
