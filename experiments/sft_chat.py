"""Chat SFT: supervised fine-tuning on conversations (the ChatGPT variant of InstructGPT step 1).

The data mixes `{"messages": [...]}` dialogues with single-turn `{"prompt", "response"}` demos
in one run (rlhf_jax/data/chat.py): the loss covers every assistant turn's content and its EOS, and
nothing else. The bundled `tiny_dialogues.jsonl` holds 1000 two-turn dialogues of the task world
whose follow-up builds on the first answer ("what is 7 plus 5?" -> "7 plus 5 is 12." ->
"and plus 3?" -> "12 plus 3 is 15."); it is `world_data.dialogue_demonstrations(1000, seed=0,
quality=1.0)`, regenerated with
  python -c "import rlhf_jax.data.lm_data as d, rlhf_jax.task.world_data as w; d.write_jsonl(
      'experiments/data/tiny_dialogues.jsonl', w.dialogue_demonstrations(1000, 0, 1.0))"

The chat role markers are reserved pieces of the tokenizer, so `init_from` must be a workdir
whose tokenizer was trained with them: every pretrain run that trains its own tokenizer does
(unless `config.chat.reserve_tokens=False`); an imported tokenizer without them fails at start
with one sentence naming the missing marker.

Tiny model, CPU, after experiments/pretrain.py (1000 dialogues + 2000 single-turn demos, 1
epoch = 179 steps, about 1.5 minutes on 2 cores; held-out loss 5.8 -> 1.4):
  python -m launch.run --config experiments/pretrain.py --workdir runs/pretrain_tiny
  python -m launch.run --config experiments/sft_chat.py --workdir runs/sft_chat_tiny \
      --config.init_from=runs/pretrain_tiny
Measured once: greedy answers to 100 held-out world follow-ups all ended with EOS in the
"a plus b is c." form, but at 0.15M parameters the numbers were almost all wrong (mean gold
score 0.03); the run shows the mechanics, not a capable chat model.

Then sample a follow-up (a `{"messages"}` prompt line, ending with a user turn):
  echo '{"messages": [{"role": "user", "content": "what is 4 plus 9?"}, {"role": "assistant",
      "content": "4 plus 9 is 13."}, {"role": "user", "content": "and plus 2?"}]}' > chat.jsonl
  python -m rlhf_jax.tools.generate --checkpoint runs/sft_chat_tiny --prompts chat.jsonl \
      --out chat_out.jsonl --greedy

Your own conversations, GPT-2 124M:
  python -m launch.run --config experiments/sft_chat.py:size=small --workdir runs/sft_chat_small \
      --config.init_from=runs/pretrain_small --config.data.train=chats.jsonl

Args (after the colon): size, family, fsdp, tensor, as in experiments/sft.py, whose settings
this file starts from.
"""

import os

from experiments import common, sft

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    c = sft.get_config(arg)
    data = os.path.join(HERE, "data")
    c.data.train = ",".join(
        os.path.join(data, f) for f in ("tiny_dialogues.jsonl", "tiny_demos.jsonl")
    )
    if c.model.size in common.CPU_SIZES:
        # A two-turn dialogue is 40-80 tokens with the tiny tokenizer; single-turn demos fewer.
        c.train.seq_len = 96
    return c
