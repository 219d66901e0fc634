"""A model's own chat template (Jinja, from its tokenizer files), rendered as transformers does.

Instruction-tuned Hugging Face models ship `chat_template` (tokenizer_config.json or
chat_template.jinja). `messages` rows are rendered with it when the tokenizer has one
(`HFTokenizer.model_template`), with the project's template (data/chat.py) otherwise. Rendering
follows transformers' `apply_chat_template`: a sandboxed `ImmutableSandboxedEnvironment` with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, `raise_exception(msg)`, a `tojson`
filter that does not escape HTML (`ensure_ascii=False`, optional `indent`, `separators`,
`sort_keys`), `strftime_now(fmt)`, and the variables `messages`, `add_generation_prompt`,
`tools=None`, `documents=None` and the tokenizer's special tokens (`bos_token`, `eos_token`,
`unk_token`, `pad_token` where defined). The rendered text is encoded like transformers'
`tokenize=True` (no special tokens added: a template writes its own `bos_token`).

The loss covers assistant turns only, found from the rendered text:
- a template with `{% generation %}...{% endgeneration %}` marks them itself: the ids overlapping a
  marked span are trained (transformers' `return_assistant_tokens_mask`);
- otherwise the conversation is rendered prefix by prefix: assistant turn i spans from the end of
  `render(messages[:i], add_generation_prompt=True)` to the end of `render(messages[:i + 1])`, each
  a prefix of the whole rendering (else an error asks for generation markers), and is trained up
  to and including the last end-of-turn id (`eos_ids`) in it; text the template writes after that
  id (Qwen's newline after `<|im_end|>`) is not, since the model is never sampled past it.

The prompt/response boundary is data/hf_tokenizer.py's rule: the text is cut at the start of every
assistant span and the pieces are encoded separately, so the ids of a generation prompt are exactly
the prefix a demonstration's last turn was trained after. For templates whose assistant turn starts
after a special token or a newline (LLaMA 3, Qwen, ChatML) the ids equal transformers'; where a BPE
merge would cross the boundary, ours are split there. A conversation ending with an assistant turn
(a demonstration, or an RM sequence) ends at that turn's last trained id, where PPO's sampler
stops, so the RM reads its score at the same token in training and in PPO.
"""

from __future__ import annotations

import datetime
import json
import re

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records the character span of its output."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        out = caller()
        tracking = getattr(self.environment, "tracking", None)
        if tracking is not None:  # (top-level blocks rendered so far, spans)
            start = sum(map(len, tracking[0]))
            tracking[1].append((start, start + len(out)))
        return out


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` without underscore attributes (no reaching into Python internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class ModelTemplate:
    """A compiled chat template.

    Attributes:
      where: the file (and key) it came from, for errors.
      has_markers: it marks assistant output with `{% generation %}`.
    """

    def __init__(self, source: str, where: str, special_tokens: dict[str, str]):
        self.where = where
        self.has_markers = bool(_MARKER.search(source))
        self._special = dict(special_tokens)
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            dict=lambda *a, **k: dict(*a, **k),
            namespace=_Namespace,
        )
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(
                f"{where}: the chat template does not parse (template line {e.lineno}: {e.message})"
            ) from None
        self._env = env

    def render(self, messages, add_generation_prompt: bool = False, spans: bool = False):
        """The template's text for `messages` ((role, content) pairs).

        Returns:
          The text; with `spans`, (text, [(start, end) of each `{% generation %}` output]).
        """
        variables = {
            **self._special,
            "messages": [{"role": r, "content": c} for r, c in messages],
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        blocks, marked = [], []
        self._env.tracking = (blocks, marked) if spans else None
        try:
            for block in self._template.generate(**variables):
                blocks.append(block)
        except jinja2.TemplateError as e:
            raise ValueError(
                f"{self.where}: the chat template refused the conversation: {e}"
            ) from None
        except (TypeError, AttributeError, KeyError, IndexError) as e:
            raise ValueError(f"{self.where}: the chat template failed to render: {e}") from None
        finally:
            self._env.tracking = None
        text = "".join(blocks)
        return (text, marked) if spans else text

    def assistant_spans(self, messages, add_generation_prompt: bool = False):
        """(text, [(start, end) per assistant span], from markers?) of one rendering."""
        if self.has_markers:
            text, marked = self.render(messages, add_generation_prompt, spans=True)
            return text, [s for s in marked if s[1] > s[0]], True
        text = self.render(messages, add_generation_prompt)
        out = []
        for i, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ValueError(
                    f"{self.where}: the chat template does not render a conversation prefix by "
                    f"prefix (assistant turn messages[{i}]), so its assistant tokens cannot be "
                    "found; mark them with {% generation %}...{% endgeneration %}"
                )
            out.append((len(before), len(upto)))
        return text, out, False


def encode(messages, tokenizer, generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Ids of a conversation under the tokenizer's own template and, per id, whether it is trained.

    Args:
      messages: the conversation, (role, content) pairs.
      tokenizer: an `HFTokenizer` with a `model_template`.
      generation_prompt: render the generation prompt after the last turn (a prompt to answer).

    Returns:
      (ids [n], train [n]: 1 on assistant tokens, see the module docstring). Without a
      generation prompt, a conversation ending with an assistant turn ends at its last trained id.
    """
    template = tokenizer.model_template
    text, spans, marked = template.assistant_spans(messages, generation_prompt)
    ids, train = encode_spans(text, spans, tokenizer, trim_to_eos=not marked)
    if generation_prompt or not messages or messages[-1][0] != "assistant":
        return ids, train
    if 1 not in train:
        raise ValueError(f"{template.where}: the chat template renders no assistant tokens")
    if marked:  # PPO's prompt must be the text the last turn was trained after
        before = template.render(messages[:-1], add_generation_prompt=True)
        if text[: spans[-1][0]] != before:
            raise ValueError(
                f"{template.where}: the chat template's generation prompt is not the text before "
                "its last {% generation %} span, so sampling would not continue what SFT trained"
            )
    end = len(train) - train[::-1].index(1)
    return ids[:end], train[:end]


def encode_spans(text: str, spans, tokenizer, trim_to_eos: bool = False):
    """(ids, train) of `text`, cut and encoded separately at each span start; an id is trained
    when its characters overlap a span (with `trim_to_eos`, only up to the span's last eos id)."""
    cuts = sorted({s for s, _ in spans if 0 < s < len(text)})
    ids, offsets = [], []
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        x, o = tokenizer.encode_offsets(text[a:b])
        ids += x
        offsets += [(a + s, a + e) for s, e in o]
    train = [0] * len(ids)
    eos = set(tokenizer.eos_ids)
    for s, e in spans:
        inside = [t for t, (ts, te) in enumerate(offsets) if te > s and ts < e]
        ends = [t for t in inside if ids[t] in eos]
        if trim_to_eos and ends:
            inside = [t for t in inside if t <= ends[-1]]
        for t in inside:
            train[t] = 1
    return ids, train
