"""The task world: gold utility, labeler, demonstrator, generators and write_world."""

import json

import pytest

from rlhf_jax.task import world, world_data

# (prompt, ideal, right number in another form, wrong answer) for every task.
CASES = [
    ("what is 7 plus 5?", "7 plus 5 is 12.", "the answer is 12.", "7 plus 5 is 13."),
    ("which is larger, 14 or 9?", "14 is larger.", "14.", "9 is larger."),
    ("which is smaller, 14 or 9?", "9 is smaller.", "it is 9.", "14 is smaller."),
    ("how many words: cat dog cat?", "there are 3 words.", "3.", "there are 2 words."),
    ("sort 5 2 8.", "2 5 8.", "2, 5, 8.", "5 2 8."),
]


@pytest.mark.parametrize("prompt,ideal,form,wrong", CASES)
def test_gold_orders_correct_form_wrong(prompt, ideal, form, wrong):
    g = lambda r, finished=True: world.gold_score(prompt, r, finished)
    assert g(ideal) == 1.0
    assert g(form) == 0.5
    assert g(wrong) == 0.0
    # Unfinished or unended: -0.5; each word past the ideal length: -0.1, at most -0.5.
    assert g(ideal, finished=False) == 0.5
    assert g(ideal[:-1]) == 0.5
    assert g(ideal + " that was easy.") == pytest.approx(1.0 - 0.3)
    assert g(ideal + " " + " ".join(["more"] * 20), finished=False) == -0.0
    assert g("") == -0.5
    # The first sentence is the claim: a right answer after a wrong one earns nothing.
    assert g(wrong + " " + ideal) == pytest.approx(0.0 - 0.1 * len(ideal.split()))


def test_gold_details():
    assert world.gold_score("what is 7 plus 5?", "  7  plus 5 is 12. ") == 1.0  # whitespace
    # The opposite comparison word voids the partial credit.
    assert world.gold_score("which is larger, 14 or 9?", "14 is smaller.") == 0.0
    assert world.gold_score("sort 5 2 8.", "2 8 5.") == 0.0
    for p, *responses in CASES:
        for r in responses:
            for finished in (True, False):
                assert -1.0 <= world.gold_score(p, r * 3, finished) <= 1.0
    with pytest.raises(ValueError, match="not a prompt of any world task"):
        world.gold_score("tell me a story", "no.")
    assert world.reward_fn(["what is 7 plus 5?"] * 2, ["7 plus 5 is 12.", "7 plus 5 is 12"]) == [
        1.0,
        0.5,
    ]


def test_parse_prompt_round_trips_generated_prompts():
    for row in world_data.eval_prompts(200, seed=3):
        assert world.parse_prompt(row["prompt"]).prompt == row["prompt"]


GENERATORS = [
    lambda seed: world_data.pretrain_corpus(50, seed),
    lambda seed: world_data.heldout_text(50, seed),
    lambda seed: world_data.demonstrations(100, seed),
    lambda seed: world_data.rm_prompts(100, seed),
    lambda seed: world_data.ppo_prompts(100, seed),
    lambda seed: world_data.eval_prompts(100, seed),
]


@pytest.mark.parametrize("gen", GENERATORS)
def test_generators_are_deterministic(gen):
    assert gen(0) == gen(0)
    assert gen(0) != gen(1)


def test_prompt_sets_are_disjoint_and_follow_the_mix():
    demos = {d["prompt"] for d in world_data.demonstrations(3000, 0)}
    rm = {d["prompt"] for d in world_data.rm_prompts(3000, 0)}
    ppo = {d["prompt"] for d in world_data.ppo_prompts(3000, 0)}
    ev = [d["prompt"] for d in world_data.eval_prompts(500, 0)]
    assert len(set(ev)) == len(ev)
    for a, b in [(rm, ppo), (rm, set(ev)), (ppo, set(ev)), (demos, set(ev)), (demos, rm)]:
        assert not a & b
    kinds = [world.parse_prompt(p).kind for p in ev]
    assert {k: kinds.count(k) for k in world.TASK_MIX} == {
        k: round(500 * w) for k, w in world.TASK_MIX.items()
    }
    # The eval split holds ~190 distinct additions: asking for far more must fail, not repeat.
    with pytest.raises(ValueError, match="too few distinct 'add' prompts"):
        world_data.eval_prompts(2000, 0)


def test_heldout_text_is_disjoint_from_pretraining():
    train = {d["text"] for d in world_data.pretrain_corpus(3000, 0)}
    held = {d["text"] for d in world_data.heldout_text(300, 0)}
    assert not train & held
    assert "User:" not in " ".join(train)  # SFT, not pretraining, teaches the dialogue format


def test_pretraining_quizzes_never_ask_eval_prompts():
    text = " ".join(d["text"] for d in world_data.pretrain_corpus(2000, 0))
    asked = [p["prompt"] for p in world_data.eval_prompts(300, 0)]
    # Additions are facts ("7 plus 5 is 12."), so only the question forms are checked.
    assert not [p for p in asked if not p.startswith("what is") and p in text]


@pytest.mark.parametrize("quality", [0.6, 0.75, 0.9])
def test_demonstration_quality(quality):
    demos = world_data.demonstrations(2000, 7, quality)
    scores = [world.gold_score(d["prompt"], d["response"]) for d in demos]
    assert abs(sum(s == 1.0 for s in scores) / len(scores) - quality) <= 0.05
    assert len({s for s in scores if s < 1.0}) >= 4  # wrong, other form, ramble, unended


def valid(ranking, k):
    flat = [i for e in ranking for i in (e if isinstance(e, list) else [e])]
    return sorted(flat) == list(range(k)) and all(
        isinstance(e, int) or len(e) >= 2 for e in ranking
    )


def test_labeler_without_noise_ranks_by_utility_with_ties():
    prompt = "what is 7 plus 5?"
    # Utilities: 0.5, 1.0, 0.0, 0.5, 1.0 (an identical copy), -0.5.
    responses = ["12.", "7 plus 5 is 12.", "7 plus 5 is 11.", "7 plus 5 is 12", "7 plus 5 is 12."]
    responses.append("")
    ranking = world_data.Labeler(noise=0.0).rank(prompt, responses, [True] * 6)
    assert ranking == [[1, 4], [0, 3], 2, 5]
    # Unfinished is worse than finished.
    assert world_data.Labeler(0.0).rank(prompt, [responses[1]] * 2, [True, False]) == [0, 1]


def test_labeler_noise_swaps_sometimes_but_mostly_prefers_the_correct_answer():
    prompt, good = "what is 7 plus 5?", "7 plus 5 is 12."
    near = ["7 plus 5 is 12. that was easy."]  # utility 0.7, close to 1.0
    others = ["7 plus 5 is 13.", "the answer is 12.", "12"]
    labeler = world_data.Labeler(noise=0.2, seed=0)
    firsts = swaps = 0
    for _ in range(500):
        ranking = labeler.rank(prompt, [*others, good, *near], [True] * 5)
        assert valid(ranking, 5)
        firsts += ranking[0] == 3
        swaps += ranking.index(4) < ranking.index(3)
    assert firsts >= 0.7 * 500  # the correct answer wins at least 70% of the time
    assert 0.05 * 500 <= swaps <= 0.3 * 500  # near-equal responses swap, but rarely
    # Identical responses always tie, even with noise.
    assert [0, 1] in labeler.rank(prompt, [good, good, "12."], [True] * 3)


def test_labeler_with_ties_ties_equal_utilities_under_noise():
    prompt = "what is 7 plus 5?"
    # Utilities 1.0, 1.0, 0.5, 0.5, 0.0: two different texts per level but the last.
    responses = ["7 plus 5 is 12.", "7  plus 5 is 12.", "12.", "the answer is 12.", "13."]
    tied, coin = world_data.Labeler(0.3, seed=0, ties=True), world_data.Labeler(0.3, seed=0)
    for _ in range(50):
        groups = [
            set(e) if isinstance(e, list) else {e} for e in tied.rank(prompt, responses, [True] * 5)
        ]
        assert {0, 1} in groups and {2, 3} in groups and {4} in groups
    # Without ties the equal pairs are split by the noise.
    rankings = [coin.rank(prompt, responses, [True] * 5) for _ in range(50)]
    assert all(len(r) == 5 for r in rankings)
    assert 0 < sum(r.index(0) < r.index(1) for r in rankings) < 50


def test_labeler_is_deterministic_and_resumable():
    samples = [
        {"prompt": p, "responses": [i, f, w, i], "finished": [True, bool(j % 2), False, j > 1]}
        for p, i, f, w in CASES
        for j in range(4)
    ]
    a = world_data.label_comparisons(samples, world_data.Labeler(0.5, seed=1))
    b = world_data.label_comparisons(samples, world_data.Labeler(0.5, seed=1))
    assert a == b and a != world_data.label_comparisons(samples, world_data.Labeler(0.5, seed=2))
    assert len(a) == len(samples)
    # A resumed collection (the tail, with a fresh labeler) reproduces the same rankings.
    assert world_data.label_comparisons(samples[8:], world_data.Labeler(0.5, seed=1)) == a[8:]
    for row in a:
        assert valid(row["ranking"], 4)
    labeler = world_data.Labeler(0.5, seed=1)
    x = [labeler.rank(s["prompt"], s["responses"], s["finished"]) for s in samples]
    labeler = world_data.Labeler(0.5, seed=1)
    assert x == [labeler.rank(s["prompt"], s["responses"], s["finished"]) for s in samples]
    # All-tied samples (identical responses) have no ranked pair and are dropped.
    same = [{"prompt": "sort 5 2 8.", "responses": ["2 5 8."] * 3, "finished": [True] * 3}]
    assert world_data.label_comparisons(same, world_data.Labeler(0.5)) == []


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_write_world_is_byte_identical(tmp_path):
    sizes = dict(pretrain=200, heldout=20, demos=50, rm_prompts=40, ppo_prompts=40, eval_prompts=30)
    paths = world_data.write_world(str(tmp_path / "w"), sizes, seed=5)
    first = {k: read(p) for k, p in paths.items()}
    again = world_data.write_world(str(tmp_path / "w"), sizes, seed=5)
    assert again == paths
    assert {k: read(p) for k, p in again.items()} == first
    assert len(first["demos"].splitlines()) == 50
    meta = json.loads(first["world"])
    assert meta["sizes"]["demos"] == 50 and meta["seed"] == 5
    assert meta["tasks"]["add"] == {"prompt": "what is 7 plus 5?", "ideal": "7 plus 5 is 12."}
    with pytest.raises(ValueError, match="unknown world sizes"):
        world_data.write_world(str(tmp_path / "w"), {"demo": 3})
