"""The world's simulated people and its datasets: demonstrator, labeler and the data generators.

This module owns everything that writes data of the task world (world.py owns the tasks, the gold
utility and the splits): pretraining and held-out text, demonstrations, RM/PPO/eval prompts, the
two-turn dialogue variants, the simulated labeler that ranks sampled responses into comparisons,
and `write_world`, which writes the whole world directory. Every dataset is in the JSONL formats
of DESIGN.md §4 and deterministic given a seed.

Pretraining text carries the knowledge (addition facts "7 plus 5 is 12.", comparisons, counted
and sorted lists, quiz sheets of questions followed by ideal answers) but never the dialogue
format: no "User: ...\\nAssistant: ..." documents, no EOS right after an answer. So a pretrained
model prompted with the template knows answers but keeps on writing, which the length and ending
penalties punish; SFT teaches the format. Quiz sheets only use prompts outside the eval split.

The demonstrator is right with probability `quality`; otherwise it makes one of four mistakes
that a labeler can see (a wrong number, a right number in another phrasing, rambling after a
right answer, a missing final period), which SFT imitates and the RM and RL can learn to avoid.

`dialogue_demonstrations` and `dialogue_prompts` write the dialogues of world.py. They are
separate generators, so `write_world` writes what it always wrote.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data import lm_data
from rlhf_jax.task import world

DEFAULT_SIZES = dict(pretrain=20000, heldout=500, demos=3000)
DEFAULT_SIZES |= dict(rm_prompts=1500, ppo_prompts=2000, eval_prompts=300)
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
THINGS = ["apples", "books", "coins", "stones", "cards", "shells", "pens", "cups"]
PLACES = ["the market", "the park", "the river", "the school", "the library", "the shop"]
ADJECTIVES = ["big", "small", "quiet", "busy", "green", "old", "new"]
EXAMPLE_PROMPTS = [
    "what is 7 plus 5?",
    "which is larger, 14 or 9?",
    "how many words: cat dog cat?",
    "sort 5 2 8.",
]
FILLERS = ["i hope that helps.", "that was easy.", "let me know if you want more."]
# Tasks whose answer is one number, so a follow-up can add to it.
DIALOGUE_MIX = {"add": 0.5, "compare": 0.25, "count": 0.25}


def _rng(seed: int, name: str) -> random.Random:
    """An independent stream per generator, so one dataset's size never shifts another's."""
    return random.Random(world.stable_int("world", name, seed))


def _quotas(n: int, mix: dict = world.TASK_MIX) -> list[str]:
    """Task kinds for n items in exact `mix` proportions (largest remainder), in mix order."""
    raw = {k: n * w for k, w in mix.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: counts[k] - raw[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return [k for k in mix for _ in range(counts[k])]


def _tasks(kinds: Sequence[str], rng: random.Random, splits: Sequence[str], unique: bool):
    """Seeded task instances of the given kinds whose prompts lie in `splits`, shuffled."""
    out, seen = [], set()
    for kind in kinds:
        for _ in range(20_000):
            task = world.draw_task(kind, rng)
            if world.split_of(task.prompt) in splits and not (unique and task.prompt in seen):
                break
        else:
            raise ValueError(f"split {splits} has too few distinct {kind!r} prompts")
        seen.add(task.prompt)
        out.append(task)
    rng.shuffle(out)
    return out


def _prompts(n: int, seed: int, split: str, unique: bool) -> list[dict]:
    return [{"prompt": t.prompt} for t in _tasks(_quotas(n), _rng(seed, split), [split], unique)]


def rm_prompts(n: int, seed: int = 0) -> list[dict]:
    """Prompts for comparison collection: `{"prompt"}` rows from the rm split (may repeat)."""
    return _prompts(n, seed, "rm", unique=False)


def ppo_prompts(n: int, seed: int = 0) -> list[dict]:
    """Prompts for PPO rollouts: `{"prompt"}` rows from the ppo split (may repeat)."""
    return _prompts(n, seed, "ppo", unique=False)


def eval_prompts(n: int, seed: int = 0) -> list[dict]:
    """Distinct held-out evaluation prompts; ValueError past the split's capacity (~600)."""
    return _prompts(n, seed, "eval", unique=True)


def _mistake(task: world.Task, rng: random.Random) -> str:
    """A plausible imperfect demonstration: each kind keeps gold utility below 1."""
    kind = rng.choice(["wrong", "form", "ramble", "unended"])
    if kind == "unended":
        return task.ideal.removesuffix(".")
    if kind == "ramble":
        return f"{task.ideal} {rng.choice([*FILLERS, task.ideal])}"
    if kind == "form":
        a = " ".join(map(str, task.answer))
        forms = {
            "add": [f"the answer is {a}.", f"{a}.", f"it is {a}."],
            "compare": [f"the {task.args[0]} one is {a}.", f"{a}."],
            "count": [f"i count {a} words.", f"{a}."],
            "sort": [f"in order: {a}.", ", ".join(a.split()) + "."],
        }[task.kind]
        return rng.choice(forms)
    if task.kind == "compare":
        return f"{sum(task.args[1:]) - task.answer[0]} is {task.args[0]}."
    if task.kind == "sort":
        s = list(task.answer)
        swappable = [i for i in range(2) if s[i] != s[i + 1]]
        if swappable:
            i = rng.choice(swappable)
            s[i], s[i + 1] = s[i + 1], s[i]
        else:
            s[2] += 1
        return " ".join(map(str, s)) + "."
    n = task.answer[0]
    wrong = n + 1 if n == 0 else n + rng.choice([-1, 1])
    if task.kind == "count":
        return f"there are {wrong} words."
    return task.ideal.removesuffix(f"{n}.") + f"{wrong}."


def demonstrations(n: int, seed: int = 0, quality: float = 0.75) -> list[dict]:
    """Simulated labeler demonstrations for SFT, from the sft split.

    Args:
      n: how many `{"prompt", "response"}` rows (prompts may repeat with different responses).
      seed: the generator's seed.
      quality: probability that a demonstration is the ideal answer (gold utility 1.0).

    Returns:
      The rows, in the demos JSONL format.
    """
    if not 0.0 <= quality <= 1.0:
        raise ValueError(f"quality must be in [0, 1], got {quality}")
    rng = _rng(seed, "demos")
    rows = []
    for t in _tasks(_quotas(n), rng, ["sft"], unique=False):
        response = t.ideal if rng.random() < quality else _mistake(t, rng)
        rows.append({"prompt": t.prompt, "response": response})
    return rows


def _dialogues(
    n: int, rng: random.Random, split: str, unique: bool
) -> list[tuple[world.Task, world.Task]]:
    """Seeded (first question, follow-up) pairs whose first question lies in `split`, shuffled."""
    out, seen = [], set()
    for kind in _quotas(n, DIALOGUE_MIX):
        for _ in range(20_000):
            first = world.draw_task(kind, rng)
            second = world.follow_up(
                first, rng.randint(0, 10), rng.randrange(len(world.FOLLOW_UPS))
            )
            key = (first.prompt, second.prompt)
            if world.split_of(first.prompt) == split and not (unique and key in seen):
                break
        else:
            raise ValueError(f"split {split!r} has too few distinct {kind!r} dialogues")
        seen.add(key)
        out.append((first, second))
    rng.shuffle(out)
    return out


def _messages(first: world.Task, second: world.Task, answer: str | None = None) -> list[dict]:
    turns = [("user", first.prompt), ("assistant", first.ideal), ("user", second.prompt)]
    turns += [("assistant", answer)] if answer is not None else []
    return [{"role": r, "content": c} for r, c in turns]


def dialogue_demonstrations(n: int, seed: int = 0, quality: float = 0.75) -> list[dict]:
    """Two-turn demonstrations for chat SFT, from the sft split: `{"messages"}` rows.

    The first answer is always ideal (it is the context the follow-up builds on); the final one
    is ideal with probability `quality`, else one of the demonstrator's mistakes.
    """
    if not 0.0 <= quality <= 1.0:
        raise ValueError(f"quality must be in [0, 1], got {quality}")
    rng = _rng(seed, "dialogue_demos")
    rows = []
    for first, second in _dialogues(n, rng, "sft", unique=False):
        answer = second.ideal if rng.random() < quality else _mistake(second, rng)
        rows.append({"messages": _messages(first, second, answer)})
    return rows


def dialogue_prompts(n: int, seed: int = 0, split: str = "ppo") -> list[dict]:
    """Conversations ending with a follow-up, for RM collection, PPO or eval: `{"messages"}` rows.

    Args:
      n: how many rows; distinct in the "eval" split (may repeat in the others).
      seed: the generator's seed.
      split: "sft", "rm", "ppo" or "eval" (the split of the first question).
    """
    if split not in world.SPLITS:
        raise ValueError(f"unknown split: {split!r}; expected one of {list(world.SPLITS)}")
    rng = _rng(seed, f"dialogue_prompts_{split}")
    pairs = _dialogues(n, rng, split, unique=split == "eval")
    return [{"messages": _messages(first, second)} for first, second in pairs]


def _piece(rng: random.Random) -> str:
    """One paragraph of world text: stories, facts, quiz sheets or descriptions."""
    kind = rng.choices(
        ["story", "add", "compare", "count", "sort", "quiz", "describe"], [2, 2, 1, 1, 1, 2, 2]
    )[0]
    reps = range(rng.randint(1, 3))
    if kind == "story":
        a, b = rng.sample(NAMES, 2)
        thing, place, x, y = rng.choice(THINGS), rng.choice(PLACES), *rng.choices(range(10), k=2)
        return (
            f"{a} went to {place} with {x} {thing}. {b} gave {a} {y} more {thing}. "
            f"now {a} has {x + y} {thing}."
        )
    if kind == "add":
        return " ".join(world.draw_task("add", rng).ideal for _ in reps)
    if kind == "compare":
        facts = []
        for _ in reps:
            lo, hi = sorted(rng.sample(range(51), 2))
            facts.append(rng.choice([f"{hi} is larger than {lo}.", f"{lo} is smaller than {hi}."]))
        return " ".join(facts)
    if kind == "count":
        words = [world.draw_task("count", rng).args for _ in reps]
        return " ".join(f"the list {' '.join(w)} has {len(w)} words." for w in words)
    if kind == "sort":
        tasks = [world.draw_task("sort", rng) for _ in reps]
        return " ".join(
            f"{t.prompt.removeprefix('sort ')[:-1]} in order is {t.ideal}" for t in tasks
        )
    if kind == "quiz":
        kinds = rng.choices(list(world.TASK_MIX), list(world.TASK_MIX.values()), k=len(reps) + 1)
        qs = _tasks(kinds, rng, ["sft", "rm", "ppo"], unique=False)
        return "quiz: " + " ".join(f"{t.prompt} {t.ideal}" for t in qs)
    name, place = rng.choice(NAMES), rng.choice(PLACES)
    return rng.choice(
        [
            f"{place} is {rng.choice(ADJECTIVES)}. {name} likes {place}.",
            f"the assistant at {place} helps {name}. {name} says thank you.",
            f"a user asks the assistant for {rng.randint(2, 9)} {rng.choice(THINGS)}.",
            f"{name} reads a book at {place}. the book is {rng.choice(ADJECTIVES)}.",
        ]
    )


def _documents(n_docs: int, seed: int, heldout: bool) -> list[dict]:
    # A document's text hash decides its side, so the two sets never share a document.
    rng, docs = _rng(seed, "heldout" if heldout else "pretrain"), []
    while len(docs) < n_docs:
        text = " ".join(_piece(rng) for _ in range(rng.randint(1, 4)))
        if (world.stable_int("doc", text) % 10 == 0) == heldout:
            docs.append({"text": text})
    return docs


def pretrain_corpus(n_docs: int, seed: int = 0) -> list[dict]:
    """World text for pretraining and the ptx term: `{"text"}` rows, no dialogue format."""
    return _documents(n_docs, seed, heldout=False)


def heldout_text(n_docs: int, seed: int = 0) -> list[dict]:
    """Held-out documents of the pretraining distribution, disjoint from every pretrain doc."""
    return _documents(n_docs, seed, heldout=True)


class Labeler:
    """Ranks K responses by gold utility plus Gaussian noise of scale `noise`.

    Near-equal responses swap more often than far-apart ones. Identical responses (same text and
    finished flag) share one noise draw, so they always tie. With `ties=True` the labeler also
    says so when two responses are equally good (equal utility: one shared draw), as
    InstructGPT's labelers could; otherwise such pairs are ordered by the noise alone, a coin
    flip that is pure label noise for the RM (about half of all pairs of SFT samples). Noise
    comes from the labeler's own stream (deterministic in call order) or, given a `key`, from a
    stream derived from (seed, key), so a resumed collection reproduces its rankings.
    """

    def __init__(self, noise: float = 0.1, seed: int = 0, ties: bool = False):
        if noise < 0:
            raise ValueError(f"labeler noise must be >= 0, got {noise}")
        self.noise, self.seed, self.ties = float(noise), int(seed), bool(ties)
        self._rng = np.random.default_rng([self.seed])

    def rng_for(self, key) -> np.random.Generator:
        """The deterministic noise stream for `key` (e.g. a sample index and its prompt)."""
        return np.random.default_rng([self.seed, world.stable_int("labeler", key)])

    def rank(self, prompt: str, responses: Sequence[str], finished: Sequence[bool], key=None):
        """A K-way ranking: best first, tied indices as a sorted list (e.g. `[2, [0, 3], 1]`).

        Args:
          prompt: the world prompt, or a conversation ending with a user turn.
          responses: K response texts without EOS.
          finished: K flags, whether each response ended with EOS.
          key: optional; draws the noise from `rng_for(key)` instead of the call-order stream.
        """
        rng = self._rng if key is None else self.rng_for(key)
        pairs = [(r, bool(f)) for r, f in zip(responses, finished, strict=True)]
        utility = [world.gold_score(prompt, *k) for k in pairs]
        keys = utility if self.ties else pairs
        noise = {}
        for k in dict.fromkeys(keys):  # distinct groups, in order of first appearance
            noise[k] = self.noise * rng.standard_normal() if self.noise else 0.0
        values = [u + noise[k] for u, k in zip(utility, keys, strict=True)]
        ranking = []
        for v in sorted(set(values), reverse=True):
            tied = [i for i, u in enumerate(values) if u == v]
            ranking.append(tied[0] if len(tied) == 1 else tied)
        return ranking


def label_comparisons(samples: Sequence[dict], labeler: Labeler) -> list[dict]:
    """Ranks sampled responses into K-way comparison rows.

    Args:
      samples: `{"prompt", "responses": [str], "finished": [bool]}` rows; `"messages"` (a
        conversation ending with a user turn) may stand for `"prompt"` and is kept in the row.
      labeler: the simulated labeler. Each sample's noise is keyed by its content, so labelling
        any subset again (a resumed collection) gives the same rankings.

    Returns:
      `{"prompt", "responses", "ranking"}` rows. A sample whose responses all tie (e.g. K
      identical samples) has no ranked pair and is left out, so it may return fewer rows.
    """
    rows = []
    for s in samples:
        if "prompt" in s:
            prompt, field = s["prompt"], {"prompt": s["prompt"]}
        else:
            prompt = [{"role": r, "content": c} for r, c in world.turns(s["messages"])]
            field = {"messages": prompt}
        responses, finished = list(s["responses"]), list(s["finished"])
        key = json.dumps([prompt, responses, finished])
        ranking = labeler.rank(prompt, responses, finished, key=key)
        if len(ranking) >= 2:
            rows.append({**field, "responses": responses, "ranking": ranking})
    return rows


def write_world(
    directory: str, sizes: dict | None = None, seed: int = 0, quality: float = 0.75
) -> dict[str, str]:
    """Writes every world dataset plus world.json into `directory`; same args -> same bytes.

    Args:
      directory: created if missing.
      sizes: row counts by name (keys of DEFAULT_SIZES); missing keys take the defaults.
      seed: the world seed.
      quality: the demonstrator's probability of an ideal answer.

    Returns:
      {"pretrain", "heldout", "demos", "rm_prompts", "ppo_prompts", "eval_prompts", "world"}
      -> file path.
    """
    unknown = set(sizes or {}) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown world sizes {sorted(unknown)}; expected {list(DEFAULT_SIZES)}")
    n = {**DEFAULT_SIZES, **(sizes or {})}
    datasets = {
        "pretrain": pretrain_corpus(n["pretrain"], seed),
        "heldout": heldout_text(n["heldout"], seed),
        "demos": demonstrations(n["demos"], seed, quality),
        "rm_prompts": rm_prompts(n["rm_prompts"], seed),
        "ppo_prompts": ppo_prompts(n["ppo_prompts"], seed),
        "eval_prompts": eval_prompts(n["eval_prompts"], seed),
    }
    paths = {
        k: lm_data.write_jsonl(os.path.join(directory, f"{k}.jsonl"), v)
        for k, v in datasets.items()
    }
    examples = [world.parse_prompt(p) for p in EXAMPLE_PROMPTS]
    meta = {
        "seed": seed,
        "sizes": n,
        "quality": quality,
        "task_mix": world.TASK_MIX,
        "tasks": {t.kind: {"prompt": t.prompt, "ideal": t.ideal} for t in examples},
        "splits": world.SPLITS,
        "utility": world.UTILITY,
        "prompt_template": world.PROMPT_TEMPLATE,
        "gold_score": "rlhf_jax.task.world:gold_score",
    }
    paths["world"] = lm_data.write_atomic(
        os.path.join(directory, "world.json"), json.dumps(meta, indent=2) + "\n"
    )
    return paths
