"""Hugging Face tokenizer directories built locally for the tokenizer.json and chat template tests.

Each is a byte-level BPE trained with the `tokenizers` library on a few sentences (well under a
second) and saved as transformers saves one (`PreTrainedTokenizerFast(tokenizer_object=...)
.save_pretrained`), with the special tokens, post-processor, chat template and generation config
of the model family it imitates. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "User: what is 7 plus 5?\nAssistant: 7 plus 5 is 12.",
    "Hello world! Hello there, how are you today? I am fine, thank you.",
    "The capital of France is Paris. Say hello to the assistant.",
    "Hello Hello Hello, said the user to the assistant and the system.",
    "  indented text, <b>bold</b> & symbols: é ü 日本",
] * 8

# LLaMA 3's chat template as published with Meta-Llama-3-8B-Instruct.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Qwen2's: ChatML with a default system turn.
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ChatML with {% generation %} markers and the helpers transformers provides: tojson (no HTML
# escaping), namespace, raise_exception, strftime_now; block tags exercise trim/lstrip_blocks.
MARKED_TEMPLATE = r"""{%- set ns = namespace(turns=0) %}
{%- if messages[0]['role'] == 'assistant' %}
    {{- raise_exception('Conversations must start with a user or system turn') }}
{%- endif %}
{%- for message in messages %}
    {%- set ns.turns = ns.turns + 1 %}
    {%- if message['role'] == 'system' %}
        {{- '<|im_start|>system\n' + strftime_now('%Y') + message['content'] | tojson }}
        {{- '<|im_end|>\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|im_start|>user ' + ns.turns|string + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
    {% endif %}
"""

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_bpe(specials, vocab_size: int = 420, bos: str | None = None) -> Tokenizer:
    """A byte-level BPE (GPT-2 / LLaMA 3 / Qwen style); with `bos`, its post-processor adds it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def save(tok: Tokenizer, directory: str, *, generation_config=None, **tokens) -> str:
    """Saves `tok` as transformers does, with `tokens` (bos_token=..., chat_template=...)."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **tokens).save_pretrained(directory)
    if generation_config is not None:
        with open(os.path.join(directory, "generation_config.json"), "w") as f:
            json.dump(generation_config, f)
    return directory


def llama3(directory: str, template: str | None = LLAMA3_TEMPLATE) -> str:
    """LLaMA 3 Instruct: bos added by the post-processor, eos <|eot_id|> plus <|end_of_text|>
    in generation_config.json, no pad token."""
    tok = train_bpe(LLAMA3_SPECIALS, bos="<|begin_of_text|>")
    ids = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    kw = {"chat_template": template} if template else {}
    return save(
        tok,
        directory,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        generation_config={
            "bos_token_id": tok.token_to_id("<|begin_of_text|>"),
            "eos_token_id": ids,
        },
        **kw,
    )


def qwen(directory: str, template: str = QWEN_TEMPLATE) -> str:
    """Qwen2 Instruct: no bos, eos <|im_end|> (and <|endoftext|> in generation_config.json),
    pad <|endoftext|>."""
    tok = train_bpe(CHATML_SPECIALS)
    ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    return save(
        tok,
        directory,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=template,
        generation_config={"eos_token_id": ids},
    )


def gpt2(directory: str, extra_tokens=()) -> str:
    """GPT-2: bos = eos = <|endoftext|>, nothing added by the post-processor, no pad, no
    template (`extra_tokens` become added special tokens, e.g. the project's chat markers)."""
    tok = train_bpe(["<|endoftext|>", *extra_tokens])
    return save(tok, directory, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
