"""A Hugging Face directory converted on disk into a stage workdir (step 0, params only).

`import_to_workdir` is what `python -m rlhf_jax.tools.convert import` runs, and what the pipeline
runs as its pretrain step when `config.init_from` names a Hugging Face model: the workdir's meta
holds the model config, and the tokenizer found beside the weights is copied in
(`tokenizer.model`, else `tokenizer.json` with its configs as `tokenizer/`), so every later stage
takes the workdir as `init_from` like any other. Reading in place, without a copy, is
hf_init.py's (`init_from="hf:DIR"`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax

from rlhf_jax.models import hf, hf_init


def check_tokenizer(file: str, vocab_size: int) -> str | None:
    """Why the stages cannot use this tokenizer yet, or None when they can."""
    from rlhf_jax.data import tokenizer as tok_lib

    try:
        tok_lib.load_tokenizer(file).check_model_vocab(vocab_size)
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    return None


def import_to_workdir(
    hf_path: str,
    workdir: str,
    mesh,
    rules,
    *,
    dtype="bfloat16",
    param_dtype="float32",
    scan_layers=False,
) -> dict:
    """Imports a HF directory into a checkpoint workdir usable as `init_from`; returns its meta.

    `dtype` is the compute dtype recorded for tools that read the workdir alone (generate,
    score); stages take theirs from their own config.
    """
    from rlhf_jax.infra import checkpoint

    directory = hf_init.hf_dir(hf_path)
    cfg, params = hf.import_hf(
        directory, mesh, rules, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers
    )
    meta = hf_init.init_meta(directory, scan_layers=scan_layers)
    meta.update(
        model=dataclasses.asdict(cfg),
        stage="import",
        config={"hf": os.path.abspath(directory), "param_dtype": param_dtype},
    )
    tok = hf_init.tokenizer_path(directory)
    hf_tok = tok is None and os.path.isfile(os.path.join(directory, "tokenizer.json"))
    if hf_tok:
        meta["tokenizer"] = hf_init.HF_TOKENIZER_DIR
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        problem = None
        if tok:
            shutil.copyfile(tok, os.path.join(workdir, hf_init.TOKENIZER_FILE))
            problem = check_tokenizer(tok, cfg.vocab_size)
        elif hf_tok:
            problem = check_tokenizer(directory, cfg.vocab_size)
            if problem is None:
                from rlhf_jax.data import tokenizer as tok_lib

                out = os.path.join(workdir, hf_init.HF_TOKENIZER_DIR)
                tok_lib.load_tokenizer(directory).save(out)
        else:
            print(
                f"warning: no tokenizer ({hf_init.TOKENIZER_FILE} or tokenizer.json) beside the "
                "weights; the stages need one (config.tokenizer.path) to train from this workdir",
                flush=True,
            )
        if problem:
            print(f"warning: the stages cannot use this tokenizer yet: {problem}", flush=True)
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        ckpt.save(0, {"params": params}, meta=meta, force=True)
    return meta
