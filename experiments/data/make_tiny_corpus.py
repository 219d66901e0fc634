"""Writes tiny_{corpus,demos,comparisons,prompts}.jsonl: small, seeded, templated data for CPU runs.

It has enough regularity (counting, sums, simple stories) that a tiny model's loss falls far
within a few hundred steps. Regenerate with `python experiments/data/make_tiny_corpus.py`.
"""

import json
import os
import random

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
THINGS = ["apples", "books", "coins", "stones", "cards", "shells", "pens", "cups"]
PLACES = ["the market", "the park", "the river", "the school", "the library", "the hill"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def story(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    thing, place = r.choice(THINGS), r.choice(PLACES)
    x, y = r.randint(1, 9), r.randint(1, 9)
    return (
        f"{a} went to {place} with {x} {thing}. {b} gave {a} {y} more {thing}. "
        f"now {a} has {x + y} {thing}."
    )


def counting(r: random.Random) -> str:
    start = r.randint(0, 5)
    words = NUMBERS[start : start + r.randint(3, 6)]
    return "we count: " + ", ".join(words) + "."


def arithmetic(r: random.Random) -> str:
    x, y = r.randint(0, 20), r.randint(0, 20)
    if r.random() < 0.5:
        return f"{x} plus {y} is {x + y}."
    x, y = max(x, y), min(x, y)
    return f"{x} minus {y} is {x - y}."


def demo(r: random.Random) -> dict:
    """An instruction and a correct, properly ended answer (for the tiny SFT example)."""
    x, y = r.randint(0, 20), r.randint(0, 20)
    if r.random() < 0.5:
        return {"prompt": f"what is {x} plus {y}?", "response": f"{x} plus {y} is {x + y}."}
    a, thing = r.choice(NAMES), r.choice(THINGS)
    return {
        "prompt": f"{a} has {x} {thing} and gets {y} more. how many {thing} now?",
        "response": f"{a} has {x + y} {thing}.",
    }


def comparison(r: random.Random) -> dict:
    """K = 2..4 responses to a demo prompt, ranked: correct and ended > wrong number > cut off
    (no final period) = rambling (tied)."""
    d = demo(r)
    good = d["response"]
    words = good.rstrip(".").split(" ")
    n = int(next(w for w in reversed(words) if w.isdigit()))
    wrong = good.replace(str(n), str(n + r.choice([-3, -2, -1, 1, 2, 3])))
    cut = " ".join(words[: max(1, len(words) - 2)])
    ramble = good + " " + " ".join(r.choice(words) for _ in range(6))
    cands = [good, wrong, cut, ramble][: r.randint(2, 4)]
    order = list(range(len(cands)))
    r.shuffle(order)  # where each candidate lands in the response list
    responses = [cands[i] for i in order]
    pos = {c: order.index(c) for c in range(len(cands))}
    ranking = [pos[0]]
    if len(cands) > 1:
        ranking.append(pos[1])
    tied = [pos[c] for c in (2, 3) if c < len(cands)]
    if tied:
        ranking.append(tied if len(tied) > 1 else tied[0])
    return {"prompt": d["prompt"], "responses": responses, "ranking": ranking}


def main(n_docs=3000, n_demos=2000, n_comparisons=1500, n_prompts=1000, seed=0):
    r = random.Random(seed)
    kinds = [story, counting, arithmetic]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_corpus.jsonl")
    with open(path, "w") as f:
        for _ in range(n_docs):
            text = " ".join(r.choice(kinds)(r) for _ in range(r.randint(1, 4)))
            f.write(json.dumps({"text": text}) + "\n")
    print(f"wrote {n_docs} documents to {path}")
    path = os.path.join(os.path.dirname(path), "tiny_demos.jsonl")
    with open(path, "w") as f:
        for _ in range(n_demos):
            f.write(json.dumps(demo(r)) + "\n")
    print(f"wrote {n_demos} demonstrations to {path}")
    path = os.path.join(os.path.dirname(path), "tiny_comparisons.jsonl")
    with open(path, "w") as f:
        for _ in range(n_comparisons):
            f.write(json.dumps(comparison(r)) + "\n")
    print(f"wrote {n_comparisons} comparisons to {path}")
    path = os.path.join(os.path.dirname(path), "tiny_prompts.jsonl")
    with open(path, "w") as f:
        for _ in range(n_prompts):
            f.write(json.dumps({"prompt": demo(r)["prompt"]}) + "\n")
    print(f"wrote {n_prompts} prompts to {path}")


if __name__ == "__main__":
    main()
