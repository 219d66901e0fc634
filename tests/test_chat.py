"""Dialogue data: messages rows, chat template, reserved tokens, loss mask, world dialogues."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, pretrain, sft_chat
from rlhf_jax.data import chat, lm_data, rm_data, sft_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import transformer as M
from rlhf_jax.rl import losses
from rlhf_jax.sampling import load
from rlhf_jax.stages import setup
from rlhf_jax.task import world, world_data

TEMPLATE = common.PROMPT_TEMPLATE
CONVO = [
    {"role": "system", "content": "be brief."},
    {"role": "user", "content": "what is 7 plus 5?"},
    {"role": "assistant", "content": "7 plus 5 is 12."},
    {"role": "user", "content": "and plus 3?"},
    {"role": "assistant", "content": "12 plus 3 is 15."},
]


@pytest.fixture(scope="module")
def docs():
    return lm_data.read_documents(pretrain.get_config().data.train)


@pytest.fixture(scope="module")
def tok(tmp_path_factory, docs):
    path = str(tmp_path_factory.mktemp("tok") / "chat.model")
    tok_lib.train_tokenizer(docs, path, 512, reserved=chat.DEFAULT.markers)
    return tok_lib.Tokenizer.load(path)


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


# --- template and tokens --------------------------------------------------------------------------


def test_render_marks_assistant_content_and_its_end():
    m = chat.parse_messages(CONVO, ends_with="assistant")
    pieces = chat.render(m)
    text = "".join(p.text if p.kind != "eos" else "[eos]" for p in pieces)
    assert text == (
        "<|system|>be brief.<|user|>what is 7 plus 5?<|assistant|>7 plus 5 is 12.[eos]"
        "<|user|>and plus 3?<|assistant|>12 plus 3 is 15.[eos]"
    )
    trained = [p.text or p.kind for p in pieces if p.train]
    assert trained == ["7 plus 5 is 12.", "eos", "12 plus 3 is 15.", "eos"]
    prompt = chat.render(m[:-1], generation_prompt=True)
    assert prompt[-1] == chat.Piece("marker", "<|assistant|>", False)
    custom = chat.ChatTemplate(system="[S]", user="[U]", assistant="[A]")
    assert "".join(p.text for p in chat.render(m[1:2], custom, True)) == "[U]what is 7 plus 5?[A]"


def test_reserved_markers_are_single_ids_never_split(tok):
    ids = {mk: tok.piece_id(mk) for mk in chat.DEFAULT.markers}
    assert sorted(ids.values()) == [4, 5, 6]  # right after pad, unk, bos, eos
    for mk, i in ids.items():
        assert tok.encode(mk) == [i]
        # Inside running text too, and it decodes back to its text.
        x = tok.encode(f"hello{mk}world")
        assert x.count(i) == 1 and tok.decode(x) == f"hello{mk}world"


def test_tokenizer_without_the_markers_is_a_clear_error(tmp_path, docs):
    plain = tok_lib.Tokenizer.load(tok_lib.train_tokenizer(docs[:300], str(tmp_path / "p"), 400))
    assert plain.piece_id("<|user|>") is None
    m = chat.parse_messages(CONVO[1:3], ends_with="assistant")
    with pytest.raises(ValueError, match=r"has no id for '<\|user\|>'.*chat tokens reserved"):
        chat.encode(m, plain)
    # A prompt row needs no marker, so single-turn data still works with it.
    assert sft_data.prompt_ids(plain, TEMPLATE, "hi")[0] == plain.bos_id


def test_pretrain_stage_reserves_the_config_markers(tmp_path):
    c = common.base_config()
    c.data.train = pretrain.get_config().data.train
    assert chat.from_config(c) == chat.DEFAULT  # the config's defaults are the module's
    tok = setup.load_tokenizer(c, str(tmp_path / "a"))
    assert tok.piece_id("<|assistant|>") == 6 and tok.chat_template == chat.DEFAULT
    c.chat.reserve_tokens = False  # the single-turn tokenizer of before
    assert setup.load_tokenizer(c, str(tmp_path / "b")).piece_id("<|assistant|>") is None


# --- SFT loss mask --------------------------------------------------------------------------------


def test_mask_covers_exactly_the_assistant_turns(tmp_path, tok):
    rows = [{"messages": CONVO}, {"prompt": "a", "response": "b"}]  # a mixed file
    demos = sft_data.read_demos(write_lines(tmp_path / "d.jsonl", rows))
    ex, cut = sft_data.encode_demos(demos, tok, TEMPLATE, seq_len=64)
    assert cut == 0
    m = ex["mask"][0].astype(bool)
    # Naive reference: every assistant turn's content then EOS, in order.
    want = []
    for turn in CONVO:
        if turn["role"] == "assistant":
            want += tok.encode(turn["content"]) + [tok.eos_id]
    assert list(ex["targets"][0][m]) == want
    # The unmasked real targets are everything else (markers, system and user content).
    real = np.arange(64) < (ex["targets"][0] != tok.pad_id).sum()
    assert (real & ~m).sum() == len(chat.encode(demos[0]["messages"], tok)[0]) - 1 - len(want)
    # The single-turn row of the same file keeps its response-only mask.
    assert list(ex["targets"][1][ex["mask"][1] > 0]) == tok.encode("b") + [tok.eos_id]


def test_user_turn_targets_do_not_move_the_loss(tok):
    demos = [{"messages": chat.parse_messages(CONVO, ends_with="assistant")}]
    ex, _ = sft_data.encode_demos(demos, tok, TEMPLATE, seq_len=64)
    model = M.build(model_config.preset("tiny", dtype="float32"), seed=0)
    logits, _ = jax.jit(lambda x: model(x))(jnp.asarray(ex["inputs"]))
    mask = jnp.asarray(ex["mask"])

    def loss(targets):
        return float(losses.masked_xent(logits, jnp.asarray(targets), mask)[0])

    base = loss(ex["targets"])
    # Targets inside the user and system turns (content and markers) changed: no effect.
    ids, train = chat.encode(demos[0]["messages"], tok)
    users = np.zeros(64, bool)
    users[: len(ids) - 1] = np.array(train[1:]) == 0
    noisy = np.where(users, (ex["targets"] + 7) % 512, ex["targets"])
    assert (noisy != ex["targets"]).sum() > 10
    assert loss(noisy) == base
    # One target inside the FIRST assistant turn changed: the loss moves (the test can fail).
    first = int(np.argmax(ex["mask"][0]))
    moved = ex["targets"].copy()
    moved[0, first] = (moved[0, first] + 1) % 512
    assert loss(moved) != base


# --- comparisons and prompts ----------------------------------------------------------------------


def test_messages_comparisons_take_the_prompt_forms_path(tmp_path, tok):
    context = CONVO[:4]
    rows = [
        {"messages": context, "responses": ["12 plus 3 is 15.", "14.", "no"], "ranking": [0, 2, 1]},
        {
            "prompt": "and plus 3?",
            "responses": ["12 plus 3 is 15.", "14.", "no"],
            "ranking": [0, 2, 1],
        },
        {"messages": context[1:2], "chosen": "7 plus 5 is 12.", "rejected": "13."},
    ]
    comps = rm_data.read_comparisons(write_lines(tmp_path / "c.jsonl", rows), k_max=3)
    msgs = chat.parse_messages(context, ends_with="user")
    assert comps[0]["prompt"] == msgs and comps[1]["prompt"] == "and plus 3?"
    assert comps[0]["ranks"] == comps[1]["ranks"] == [0, 2, 1]
    ex, info = rm_data.encode_comparisons(comps, tok, TEMPLATE, seq_len=64, k_max=3)
    assert info["cut_sequences"] == 0
    for row, prompt in ((0, msgs), (1, "and plus 3?")):
        prefix = sft_data.prompt_ids(tok, TEMPLATE, prompt)
        for j, r in enumerate(rows[row]["responses"]):
            want = prefix + tok.encode(r) + [tok.eos_id]
            got = ex["tokens"][row, j][ex["mask"][row, j]]
            assert list(got) == want and got[-1] == tok.eos_id  # the RM reads at the EOS
    np.testing.assert_array_equal(ex["ranks"][0], ex["ranks"][1])
    np.testing.assert_array_equal(ex["kmask"][0], ex["kmask"][1])
    pairs = rm_data.pair_examples(ex)
    np.testing.assert_array_equal(pairs["tokens"][:2, 0], ex["tokens"][0, [0, 0]])
    # Conversations are hashable prompts: the split by prompt keeps each one on one side.
    train, held = rm_data.split_by_prompt(comps * 3, 0.34, seed=0)
    assert {c["prompt"] for c in train}.isdisjoint({c["prompt"] for c in held})


def test_messages_prompts_end_with_the_assistant_marker(tmp_path, tok):
    path = write_lines(
        tmp_path / "p.jsonl",
        [{"messages": CONVO[:4]}, "", {"prompt": "hi"}, {"messages": CONVO[1:2]}],
    )
    prompts, lines = load.read_prompts(path)
    assert lines == [1, 3, 4] and prompts[1] == "hi"
    assert sft_data.read_prompts(path) == prompts
    ex, cut = sft_data.encode_prompts(prompts, tok, TEMPLATE, prompt_len=48)
    assistant = tok.piece_id("<|assistant|>")
    assert cut == 0 and ex["tokens"][0, -1] == assistant and ex["tokens"][2, -1] == assistant
    assert list(ex["tokens"][1][ex["mask"][1]]) == sft_data.prompt_ids(tok, TEMPLATE, "hi")
    # Generation prompts are exactly the prefix SFT trained the final answer to follow.
    full, _ = chat.encode(chat.parse_messages(CONVO, ends_with="assistant"), tok)
    p = list(ex["tokens"][0][ex["mask"][0]])
    assert full[: len(p)] == p and full[len(p) :] == tok.encode(CONVO[4]["content"]) + [3]
    ids = load.encode_prompts(prompts, lines, path, tok, TEMPLATE, room=None)
    assert ids[0] == p
    assert chat.prompt_record(prompts[0]) == {"messages": CONVO[:4]}
    assert chat.prompt_record("hi") == {"prompt": "hi"}


U, A, S = ({"role": r, "content": "x"} for r in ("user", "assistant", "system"))
BAD = [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] is not an object with 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": 3}]}, "content must be str, got int"),
    ({"messages": [U, U, A]}, r"messages\[1\] is a user turn where an assistant turn is due"),
    ({"messages": [U, S, A]}, "only come first"),
    ({"messages": [A]}, r"messages\[0\] is an assistant turn where a user turn is due"),
    ({"messages": CONVO[1:3], "prompt": "p"}, "use one form per line"),
]


@pytest.mark.parametrize("line, message", BAD)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    good_demo = {"messages": CONVO}
    path = write_lines(tmp_path / "bad.jsonl", [good_demo, "  ", line])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*" + message):
        sft_data.read_demos(path)


@pytest.mark.parametrize(
    "reader, line, message",
    [
        ("demos", {"messages": CONVO[:2]}, "no assistant turn to learn from"),
        (
            "demos",
            {"messages": CONVO[:4]},
            "end with an assistant turn, but the last turn is a user",
        ),
        ("demos", {"messages": CONVO, "response": "x"}, "both 'messages' and 'response'"),
        (
            "prompts",
            {"messages": CONVO},
            "end with a user turn, but the last turn is an assistant",
        ),
        ("prompts", {"text": "x"}, "field 'prompt' is missing"),
        (
            "comparisons",
            {"messages": CONVO, "chosen": "a", "rejected": "b"},
            "must end with a user turn",
        ),
        ("comparisons", {"messages": [], "chosen": "a", "rejected": "b"}, "non-empty list"),
    ],
)
def test_each_reader_checks_its_messages(tmp_path, reader, line, message):
    path = write_lines(tmp_path / "bad.jsonl", ["", "", line])
    read = {
        "demos": sft_data.read_demos,
        "prompts": sft_data.read_prompts,
        "comparisons": rm_data.read_comparisons,
    }[reader]
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*" + message):
        read(path)


# --- world dialogues ------------------------------------------------------------------------------


def test_world_dialogues_are_deterministic_and_split():
    a = world_data.dialogue_demonstrations(40, seed=3, quality=0.5)
    assert a == world_data.dialogue_demonstrations(40, seed=3, quality=0.5)
    assert a != world_data.dialogue_demonstrations(40, seed=4, quality=0.5)
    for row in a:
        m = chat.parse_messages(row["messages"], ends_with="assistant")  # valid rows
        assert world.split_of(m[0][1]) == "sft" and len(m) == 4
    # With quality 1 every final answer is ideal, so it scores 1 as the final turn.
    for row in world_data.dialogue_demonstrations(20, seed=0, quality=1.0):
        *ctx, last = row["messages"]
        assert world.gold_score_messages(ctx, last["content"]) == 1.0
    evals = world_data.dialogue_prompts(50, seed=0, split="eval")
    assert evals == world_data.dialogue_prompts(50, seed=0, split="eval")
    keys = [json.dumps(r["messages"]) for r in evals]
    assert len(set(keys)) == 50
    assert all(r["messages"][-1]["role"] == "user" for r in evals)
    with pytest.raises(ValueError, match="unknown split"):
        world_data.dialogue_prompts(3, split="test")


def test_gold_score_judges_the_follow_up():
    ctx = [
        {"role": "user", "content": "what is 7 plus 5?"},
        {"role": "assistant", "content": "7 plus 5 is 12."},
        {"role": "user", "content": "and plus 3?"},
    ]
    score = lambda r, f=True: world.gold_score_messages(ctx, r, f)  # noqa: E731
    assert score("12 plus 3 is 15.") == 1.0
    assert score("15.") == 0.5  # right number, other phrasing
    assert score("7 plus 5 is 12.") == 0.0  # answers the first question again
    assert score("12 plus 3 is 16.") == 0.0
    assert score("12 plus 3 is 15.", False) == 0.5  # no EOS
    # The follow-up builds on the TRUE first answer even when the context's answer is wrong.
    wrong = [ctx[0], {"role": "assistant", "content": "7 plus 5 is 13."}, ctx[2]]
    assert world.gold_score_messages(wrong, "12 plus 3 is 15.") == 1.0
    # gold_score and the labeler take conversations (chat.Messages too) as prompts.
    msgs = chat.parse_messages(ctx, ends_with="user")
    assert world.gold_score(msgs, "12 plus 3 is 15.") == 1.0
    assert world.gold_score(msgs[:1], "7 plus 5 is 12.") == 1.0  # one user turn: the first task
    sample = {"messages": msgs, "responses": ["15.", "12 plus 3 is 15."], "finished": [True, True]}
    (row,) = world_data.label_comparisons([sample], world_data.Labeler(noise=0.0))
    assert row == {"messages": ctx, "responses": sample["responses"], "ranking": [1, 0]}
    # The PPO reward hook reads decoded prompts: rendered conversations and templated questions.
    rendered = (
        "<|user|>what is 7 plus 5?<|assistant|>7 plus 5 is 12.<|user|>and plus 3?<|assistant|>"
    )
    assert chat.parse_rendered(rendered) == msgs
    templated = TEMPLATE.replace("{prompt}", "what is 7 plus 5?")
    assert world.reward_fn([rendered, templated], ["12 plus 3 is 15.", "7 plus 5 is 12."]) == [1, 1]


def test_sft_chat_config_reads_mixed_data():
    c = sft_chat.get_config()
    assert c.stage == "sft" and c.train.seq_len == 96
    demos = sft_data.read_demos(c.data.train)
    n_chat = sum("messages" in d for d in demos)
    assert n_chat == 1000 and len(demos) > n_chat
