"""data/chat_template.py: a model's own chat template, rendered and encoded as transformers does.

For a LLaMA-3 template, a Qwen template with a default system turn and a ChatML template with
{% generation %} markers (and tojson / namespace / raise_exception), on tokenizers built locally
(tests/hf_tokenizers.py): our text and ids equal `apply_chat_template` (tokenize True and False,
add_generation_prompt both ways), our assistant mask equals `return_assistant_tokens_mask`, and
the prefix-by-prefix masks cover exactly each assistant turn and its end-of-turn token. Then the
wiring: SFT, RM and PPO prompts use the model's template, the project's template stays for a
model without one, and a bad template is one line naming its file.
"""

import os

import hf_tokenizers as build
import pytest

from rlhf_jax.data import chat, chat_template, rm_data, sft_data
from rlhf_jax.data import tokenizer as tok_lib

transformers = pytest.importorskip("transformers")

SYSTEM = "Be <b>brief</b> & kind: é"
CONVOS = {
    "one turn": [("user", "what is 7 plus 5?"), ("assistant", "7 plus 5 is 12.")],
    "system, two turns": [
        ("system", SYSTEM),
        ("user", "Hello there"),
        ("assistant", "  Hello! How are you?  "),  # spaces the LLaMA template trims
        ("user", "I am fine, thank you."),
        ("assistant", "Say hello to the user."),
    ],
}
KINDS = ("llama3", "qwen", "marked")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpl")
    return {
        "llama3": build.llama3(str(root / "llama3")),
        "qwen": build.qwen(str(root / "qwen")),
        "marked": build.qwen(str(root / "marked"), template=build.MARKED_TEMPLATE),
    }


@pytest.fixture(scope="module")
def toks(dirs):
    return {k: tok_lib.load_tokenizer(d) for k, d in dirs.items()}


@pytest.fixture(scope="module")
def refs(dirs):
    return {k: transformers.AutoTokenizer.from_pretrained(d) for k, d in dirs.items()}


def as_json(messages):
    return [{"role": r, "content": c} for r, c in messages]


def apply(ref, messages, **kw):
    return ref.apply_chat_template(as_json(messages), return_dict=False, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("convo", list(CONVOS))
def test_text_and_ids_equal_apply_chat_template(kind, convo, toks, refs):
    tok, ref, m = toks[kind], refs[kind], tuple(CONVOS[convo])
    for messages in (m, m[:-1]):  # ending with the assistant turn, and the prompt before it
        for gen in (False, True):
            text = tok.model_template.render(messages, add_generation_prompt=gen)
            assert text == apply(ref, messages, tokenize=False, add_generation_prompt=gen)
    # A prompt to answer: exactly transformers' ids.
    prompt = chat.prompt_ids(m[:-1], tok)
    assert prompt == apply(ref, m[:-1], tokenize=True, add_generation_prompt=True)
    assert sft_data.prompt_ids(tok, "{prompt}", m[:-1]) == prompt
    ids, _ = chat.encode(m[:-1], tok)
    assert ids == apply(ref, m[:-1], tokenize=True)
    # A demonstration: transformers' ids up to its last end-of-turn token, where PPO's sampler
    # stops; only template text after it (ChatML's newline) is left out.
    ids, _ = chat.encode(m, tok)
    full = apply(ref, m, tokenize=True)
    assert ids == full[: len(ids)] and ids[-1] == tok.eos_id
    assert ref.decode(full[len(ids) :]) == ("" if kind == "llama3" else "\n")
    assert ids[: len(prompt)] == prompt  # PPO samples after what SFT trained the answer after


@pytest.mark.parametrize("convo", list(CONVOS))
def test_generation_markers_give_transformers_assistant_mask(convo, toks, refs):
    tok, ref, m = toks["marked"], refs["marked"], tuple(CONVOS[convo])
    assert tok.model_template.has_markers
    ids, train = chat.encode(m, tok)
    out = ref.apply_chat_template(as_json(m), return_assistant_tokens_mask=True, return_dict=True)
    assert ids == out["input_ids"][: len(ids)]
    assert train == out["assistant_masks"][: len(ids)]
    assert not any(out["assistant_masks"][len(ids) :]) and sum(train) > 0


@pytest.mark.parametrize("kind,end", [("llama3", "<|eot_id|>"), ("qwen", "<|im_end|>")])
def test_prefix_by_prefix_mask_covers_each_assistant_turn(kind, end, toks, refs):
    """Without markers: the trained ids are, turn by turn, the assistant content as the template
    writes it (LLaMA trims it) and its end-of-turn token; nothing else."""
    tok, ref, m = toks[kind], refs[kind], tuple(CONVOS["system, two turns"])
    ids, train = chat.encode(m, tok)
    runs, run = [], []
    for i, t in zip(ids, train, strict=True):
        if t:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    answers = [c.strip() if kind == "llama3" else c for r, c in m if r == "assistant"]
    assert runs == [ref.encode(a + end, add_special_tokens=False) for a in answers]


def test_sft_rm_and_ppo_use_the_models_template(toks, refs):
    tok, ref = toks["qwen"], refs["qwen"]
    m = tuple(CONVOS["one turn"])
    demo = {"messages": m, "prompt": m[:-1], "response": m[-1][1]}
    ids, train = sft_data.demo_ids(tok, "{prompt}", demo)
    assert ref.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.")
    ex, _ = sft_data.encode_demos([demo], tok, "{prompt}", seq_len=64)
    n = len(ids) - 1
    assert ex["inputs"][0, :n].tolist() == ids[:-1] and ex["mask"][0, :n].tolist() == train[1:]
    assert (ex["mask"][0, n:] == 0).all()
    # The RM scores each response as the template renders it as the conversation's last turn.
    comp = {"prompt": m[:-1], "responses": [m[-1][1], "No."], "ranks": [0, 1]}
    rm, _ = rm_data.encode_comparisons([comp], tok, "{prompt}", seq_len=64, k_max=2)
    assert rm["tokens"][0, 0, : rm["mask"][0, 0].sum()].tolist() == ids
    other = chat.encode((*m[:-1], ("assistant", "No.")), tok)[0]
    assert rm["tokens"][0, 1, : rm["mask"][0, 1].sum()].tolist() == other
    # PPO's prompts: the generation prompt, left-padded.
    p = apply(ref, m[:-1], tokenize=True, add_generation_prompt=True)
    batch, _ = sft_data.encode_prompts([m[:-1]], tok, "{prompt}", prompt_len=len(p) + 2)
    assert batch["tokens"][0, 2:].tolist() == p and batch["mask"][0].sum() == len(p)


def test_the_projects_template_stays_for_models_without_one(tmp_path):
    """A tokenizer.json model without chat_template renders messages with config.chat's markers
    (here added tokens of the tokenizer); GPT-2 adds no bos, so none is prepended."""
    d = build.gpt2(str(tmp_path / "gpt2"), extra_tokens=chat.DEFAULT.markers)
    tok = tok_lib.load_tokenizer(d, chat_template=chat.DEFAULT)
    assert tok.model_template is None
    m = tuple(CONVOS["one turn"])
    ids, train = chat.encode(m, tok)
    user, assistant = (tok.piece_id(x) for x in (chat.DEFAULT.user, chat.DEFAULT.assistant))
    a = tok.encode(m[1][1]) + [tok.eos_id]
    assert ids == [user, *tok.encode(m[0][1]), assistant, *a]
    assert train == [0] * (len(ids) - len(a)) + [1] * len(a)


def test_bad_templates_are_one_line_naming_the_file(tmp_path):
    d = build.qwen(str(tmp_path / "syntax"), template="{% for m in messages %}{{ m.content }}")
    with pytest.raises(ValueError) as e:
        tok_lib.load_tokenizer(d)
    assert os.path.join(d, "chat_template.jinja") in str(e.value) and "\n" not in str(e.value)
    assert "does not parse" in str(e.value)

    d = build.qwen(str(tmp_path / "marked"), template=build.MARKED_TEMPLATE)
    tok = tok_lib.load_tokenizer(d)
    with pytest.raises(ValueError, match="must start with a user or system turn") as e:
        chat.encode((("assistant", "hi"),), tok)
    assert "chat_template.jinja" in str(e.value)

    # The last assistant turn rendered unlike earlier ones: no prefix-by-prefix spans.
    odd = (
        "{% for m in messages %}{% if loop.last %}!{% endif %}{{ m.content }}<|im_end|>{% endfor %}"
    )
    tok = tok_lib.load_tokenizer(build.qwen(str(tmp_path / "odd"), template=odd))
    with pytest.raises(ValueError, match=r"prefix by prefix .*\{% generation %\}"):
        chat.encode(tuple(CONVOS["one turn"]), tok)


def test_template_from_tokenizer_config_and_named_templates(tmp_path, toks):
    """Older saves keep the template in tokenizer_config.json (a string, or named templates)."""
    import json

    d = build.qwen(str(tmp_path / "q"))
    os.remove(os.path.join(d, "chat_template.jinja"))
    cfg_file = os.path.join(d, "tokenizer_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    m = tuple(CONVOS["one turn"])
    want = toks["qwen"].model_template.render(m)
    for value in (build.QWEN_TEMPLATE, [{"name": "default", "template": build.QWEN_TEMPLATE}]):
        with open(cfg_file, "w") as f:
            json.dump({**cfg, "chat_template": value}, f)
        assert tok_lib.load_tokenizer(d).model_template.render(m) == want
    with open(cfg_file, "w") as f:
        json.dump({**cfg, "chat_template": 3}, f)
    with pytest.raises(ValueError, match="tokenizer_config.json: chat_template must be"):
        tok_lib.load_tokenizer(d)


def test_sandbox_refuses_python_internals(tmp_path):
    bad = "{{ messages.__class__.__mro__ }}"
    tok = tok_lib.load_tokenizer(build.qwen(str(tmp_path / "s"), template=bad))
    with pytest.raises(ValueError, match="chat_template.jinja"):
        tok.model_template.render((("user", "hi"),))
    assert chat_template.ModelTemplate("{{ 'é<b>' | tojson }}", "t", {}).render(()) == '"é<b>"'
