"""A seeded, download-free task world that makes every pipeline stage meaningful for tiny models.

This module owns the world's rules: its four verifiable tasks, the gold utility (the labeler's
hidden, noiseless preference), the disjoint prompt splits and the rule-based `reward_fn`. The
simulated labeler and demonstrator and the generators that write every dataset the pipeline reads
live in world_data.py.

Tasks (lowercase, digits for numbers; the ideal answer always ends with ".")::

    add      what is 7 plus 5?                 -> 7 plus 5 is 12.        (operands 0..30)
    compare  which is larger, 14 or 9?         -> 14 is larger.          (also "smaller"; 0..50)
    count    how many words: cat dog cat?      -> there are 3 words.     (2..7 words)
    sort     sort 5 2 8.                       -> 2 5 8.                 (three numbers 0..20)

Gold utility, in [-1, 1] (`gold_score`), on the whitespace-stripped response text:
  correctness: the claim is the first sentence (up to and including the first "."). It earns 1.0
  if it is the ideal answer (whitespace-normalised), 0.5 if its last numbers are the answer but
  the phrasing differs ("12.", "the answer is 12.") and it does not contain the opposite word of
  a comparison, else 0.
  minus a length penalty of 0.1 per whitespace word beyond the ideal answer's, at most 0.5;
  minus 0.5 unless the response is finished (the model emitted EOS) and ends with ".".

Prompt sets are split by a stable hash of the prompt text into disjoint sft/rm/ppo/eval regions.
The pipeline's PPO uses the learned RM; `reward_fn` (the gold utility) is for ablations only.

Dialogues (the multi-turn variant, `messages` rows of rlhf_jax/data/chat.py): a first question whose
answer is one number (add, compare, count), its ideal answer, then a follow-up that adds to that
answer, which the model must read from the conversation::

    user: what is 7 plus 5?   assistant: 7 plus 5 is 12.   user: and plus 3?   -> 12 plus 3 is 15.

`gold_score` of a conversation judges its final answer as an addition task
(`gold_score_messages`). A dialogue lies in the split of its first question.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Sequence

from rlhf_jax.data import chat, sft_data

PROMPT_TEMPLATE = sft_data.PROMPT_TEMPLATE  # the world shows prompts as every stage does
TASK_MIX = {"add": 0.3, "compare": 0.25, "count": 0.2, "sort": 0.25}
# Percent ranges of a prompt's stable hash; disjoint by construction.
SPLITS = {"sft": (0, 30), "rm": (30, 55), "ppo": (55, 80), "eval": (80, 100)}
UTILITY = (
    "correctness of the first sentence (1.0 ideal answer, 0.5 right number(s) in another "
    "phrasing, 0 otherwise) - 0.1 per word beyond the ideal answer's word count (at most 0.5) "
    "- 0.5 unless finished with EOS and ending with '.'; range [-1, 1]"
)
NOUNS = ["cat", "dog", "cup", "pen", "hat", "box", "egg", "sun", "key", "bus"]

_PROMPT_RES = {
    "add": re.compile(r"what is (\d+) plus (\d+)\?"),
    "compare": re.compile(r"which is (larger|smaller), (\d+) or (\d+)\?"),
    "count": re.compile(r"how many words: ([a-z]+(?: [a-z]+)*)\?"),
    "sort": re.compile(r"sort (\d+) (\d+) (\d+)\."),
}
# The follow-up phrasings of a dialogue (see world_data.DIALOGUE_MIX).
FOLLOW_UPS = ("and plus {n}?", "what is that plus {n}?")
_FOLLOW_UP_RE = re.compile(r"(?:and|what is that) plus (\d+)\?")


@dataclasses.dataclass(frozen=True)
class Task:
    """One task instance: what is asked, the ideal answer and how to check it."""

    kind: str
    prompt: str
    ideal: str
    answer: tuple[int, ...]  # the numbers the answer must end with, in order
    banned: tuple[str, ...] = ()  # words that contradict the answer (the other comparison)
    args: tuple = ()


def make_task(kind: str, *args) -> Task:
    """The instance of task `kind` with its parameters (see the module docstring)."""
    if kind == "add":
        a, b = args
        return Task(kind, f"what is {a} plus {b}?", f"{a} plus {b} is {a + b}.", (a + b,), (), args)
    if kind == "compare":
        which, a, b = args
        ans = max(a, b) if which == "larger" else min(a, b)
        other = "smaller" if which == "larger" else "larger"
        prompt = f"which is {which}, {a} or {b}?"
        return Task(kind, prompt, f"{ans} is {which}.", (ans,), (other,), args)
    if kind == "count":
        words = tuple(args)
        prompt = f"how many words: {' '.join(words)}?"
        return Task(kind, prompt, f"there are {len(words)} words.", (len(words),), (), words)
    if kind == "sort":
        s = sorted(args)
        ideal = " ".join(map(str, s)) + "."
        return Task(kind, f"sort {args[0]} {args[1]} {args[2]}.", ideal, tuple(s), (), args)
    raise ValueError(f"unknown task kind: {kind!r}; expected one of {list(TASK_MIX)}")


def parse_prompt(prompt: str) -> Task:
    """The task instance a world prompt asks; ValueError for a prompt of no task."""
    text = prompt.strip()
    for kind, pattern in _PROMPT_RES.items():
        m = pattern.fullmatch(text)
        if m:
            if kind == "count":
                return make_task(kind, *m.group(1).split())
            if kind == "compare":
                return make_task(kind, m.group(1), int(m.group(2)), int(m.group(3)))
            return make_task(kind, *map(int, m.groups()))
    raise ValueError(f"prompt {prompt!r} is not a prompt of any world task {list(TASK_MIX)}")


def draw_task(kind: str, rng: random.Random) -> Task:
    """A random instance of task `kind`, in the operand ranges of the module docstring."""
    if kind == "add":
        return make_task(kind, rng.randint(0, 30), rng.randint(0, 30))
    if kind == "compare":
        return make_task(kind, rng.choice(["larger", "smaller"]), *rng.sample(range(51), 2))
    if kind == "count":
        return make_task(kind, *rng.choices(NOUNS, k=rng.randint(2, 7)))
    return make_task(kind, *(rng.randint(0, 20) for _ in range(3)))


def gold_score(prompt, response: str, finished: bool = True) -> float:
    """The labeler's hidden, noiseless utility of `response` to `prompt`, in [-1, 1].

    Args:
      prompt: a world prompt (no template), or a conversation (see `gold_score_messages`).
      response: the response text, without the EOS token.
      finished: whether the model emitted EOS (False when it ran out of tokens).

    Returns:
      correctness - length penalty - ending penalty, as the module docstring defines them.
    """
    if not isinstance(prompt, str):
        return gold_score_messages(prompt, response, finished)
    return _judge(parse_prompt(prompt), response, finished)


def _judge(task: Task, response: str, finished: bool) -> float:
    text = response.strip()
    first = text[: text.index(".") + 1] if "." in text else text
    claim = " ".join(first.removesuffix(".").split())
    numbers = tuple(int(x) for x in re.findall(r"\d+", claim))
    if claim == task.ideal.removesuffix("."):
        correct = 1.0
    elif numbers[-len(task.answer) :] == task.answer and not set(task.banned) & set(claim.split()):
        correct = 0.5
    else:
        correct = 0.0
    extra = max(0, len(text.split()) - len(task.ideal.split()))
    ending = 0.0 if finished and text.endswith(".") else 0.5
    # Rounded so that equal utilities compare equal (the labeler turns them into ties).
    return round(correct - min(0.5, 0.1 * extra) - ending, 6)


def follow_up(first: Task, n: int, phrasing: int = 0) -> Task:
    """The follow-up "and plus n?" to `first`: an add task on first's (true) answer."""
    if len(first.answer) != 1:
        raise ValueError(f"a {first.kind!r} task has no single-number answer to follow up on")
    task = make_task("add", first.answer[0], n)
    return dataclasses.replace(task, prompt=FOLLOW_UPS[phrasing].format(n=n))


def turns(messages) -> list[tuple[str, str]]:
    """(role, content) pairs of `[{"role", "content"}, ...]` or of `chat.Messages`."""
    return [(m["role"], m["content"]) if isinstance(m, dict) else tuple(m) for m in messages]


def parse_dialogue(messages) -> Task:
    """The task the last user turn of a world conversation asks; ValueError if none.

    A follow-up adds to the TRUE answer of the first question, whatever the assistant said in
    between: the world's facts do not change with a wrong answer (and generated contexts always
    hold the ideal one).
    """
    users = [c for r, c in turns(messages) if r == "user"]
    if len(users) == 1:
        return parse_prompt(users[0])
    if len(users) == 2:
        m = _FOLLOW_UP_RE.fullmatch(users[1].strip())
        if m is None:
            raise ValueError(f"{users[1]!r} is not a follow-up of the world ({FOLLOW_UPS})")
        task = follow_up(parse_prompt(users[0]), int(m.group(1)))
        return dataclasses.replace(task, prompt=users[1].strip())
    raise ValueError(f"a world conversation has 1 or 2 user turns, got {len(users)}")


def gold_score_messages(messages, response: str, finished: bool = True) -> float:
    """`gold_score` of `response` as the final assistant turn after `messages`.

    Args:
      messages: the context, ending with a user turn: `[{"role", "content"}, ...]` or
        `chat.Messages`; system turns are ignored.
      response: the final answer's text, without EOS.
      finished: whether the model emitted EOS.
    """
    return _judge(parse_dialogue(messages), response, finished)


def _decoded_prompt(text: str):
    """The world prompt in a decoded policy prompt: a rendered conversation (default chat
    markers), the prompt template around a question, or the bare question."""
    if chat.DEFAULT.user in text:
        return chat.parse_rendered(text)
    head, tail = PROMPT_TEMPLATE.split("{prompt}")
    if text.startswith(head) and text.endswith(tail):
        return text[len(head) : len(text) - len(tail)]
    return text


def reward_fn(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Gold utility as a rule-based PPO reward (`ppo.reward_fn="rlhf_jax.task.world:reward_fn"`).

    For ablations only: the pipeline's PPO optimises the learned RM. A response counts as finished
    when it ends with "." (the hook does not see whether EOS was emitted). Prompts may be the
    decoded policy prompts: templated questions or rendered conversations.
    """
    pairs = zip(prompts, responses, strict=True)
    return [gold_score(_decoded_prompt(p), r, r.rstrip().endswith(".")) for p, r in pairs]


def stable_int(*parts) -> int:
    """A 64-bit integer hash of `parts` that, unlike hash(), is the same in every process."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def split_of(prompt: str) -> str:
    """Which disjoint prompt region ("sft", "rm", "ppo" or "eval") a prompt belongs to."""
    bucket = stable_int("split", prompt.strip()) % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)
