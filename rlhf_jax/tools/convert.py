"""Hugging Face model directories <-> rlhf_jax workdirs: the convert tool.

  python -m rlhf_jax.tools.convert import --hf /models/Llama-3.2-1B --out runs/llama1b
  python -m rlhf_jax.tools.convert export --checkpoint runs/sft --out hf/sft
  python -m rlhf_jax.tools.convert export --checkpoint runs/sft_lora --out hf/lora --adapters-only

`import` writes a normal checkpoint workdir (step 0, params only) whose meta holds the model
config, plus the tokenizer found beside the weights (`tokenizer.model`, else `tokenizer.json` and
its configs as `tokenizer/`), so `init_from=runs/llama1b` works like any stage's workdir.
`export` restores a workdir's params with its stored model config and writes a directory
`transformers` loads; a reward or value model (scalar head) becomes
`*ForSequenceClassification` with one label (see hf_map.py), with the RM's normalisation bias kept
as config field `rlhf_jax_reward_bias`. The tensor mapping itself lives in hf_map.py, reading and
writing safetensors directories in hf.py.

`export --adapters-only` writes a LoRA workdir's adapters alone, unmerged, in PEFT's layout
(`adapter_config.json` + `adapter_model.safetensors`, models/hf_peft.py) for
`peft.PeftModel.from_pretrained(base, DIR)`, where base is the HF model the adapters sit on: the
workdir's `hf:DIR` base, named in the config, or else the merged export of its base workdir.

`init_from="hf:DIR"` reads the HF directory directly, without this tool (models/hf_init.py).
"""

from __future__ import annotations

import argparse
import os
import shutil

import jax

from rlhf_jax.infra import cli
from rlhf_jax.models import hf, hf_init
from rlhf_jax.models.hf_import import check_tokenizer, import_to_workdir

# ----------------------------------------------------------------------------- workdirs


def export_workdir(
    workdir: str, out_dir: str, mesh, rules, *, step=None, dtype=None, max_shard_bytes=5 * 2**30
) -> list[str]:
    """Exports a workdir's params (its latest checkpoint, or `step`) to a HF directory; a LoRA
    workdir's adapters are merged into its base (infra/restore.py)."""
    from rlhf_jax.infra import checkpoint, restore
    from rlhf_jax.infra import state as state_lib

    meta = checkpoint.read_meta(workdir, step)
    cfg = restore.stored_model(meta, workdir)
    abstract = state_lib.abstract_params(cfg, mesh, rules)
    params = restore.restore_params(workdir, abstract, rules, step)
    ids = {k: v for k, v in (meta.get("hf") or {}).items() if k.endswith("_token_id")}
    tok = os.path.join(workdir, hf_init.TOKENIZER_FILE)
    tok = tok if os.path.isfile(tok) else os.path.join(workdir, hf_init.HF_TOKENIZER_DIR)
    usable = os.path.exists(tok) and check_tokenizer(tok, cfg.vocab_size) is None
    if usable:
        from rlhf_jax.data import tokenizer as tok_lib

        t = tok_lib.load_tokenizer(tok)
        eos = list(t.eos_ids) if len(t.eos_ids) > 1 else t.eos_id
        ids = ids or {"bos_token_id": t.bos_id, "eos_token_id": eos}
        if ids.get("pad_token_id") is None and t.has_pad:  # else export_hf pads an RM with eos
            ids["pad_token_id"] = t.pad_id
    files = hf.export_hf(
        params,
        cfg,
        out_dir,
        dtype=dtype,
        token_ids=ids,
        reward_bias=meta.get("reward_bias"),  # written for an RM (scalar head) only
        max_shard_bytes=max_shard_bytes,
    )
    if jax.process_index() == 0 and os.path.isfile(tok):
        shutil.copyfile(tok, os.path.join(out_dir, hf_init.TOKENIZER_FILE))
        files.append(os.path.join(out_dir, hf_init.TOKENIZER_FILE))
    elif jax.process_index() == 0 and os.path.isdir(tok):  # tokenizer.json and its configs
        for name in sorted(os.listdir(tok)):
            if name != "config.json":  # export_hf wrote the model's own
                shutil.copyfile(os.path.join(tok, name), os.path.join(out_dir, name))
                files.append(os.path.join(out_dir, name))
    return files


def export_adapters(workdir: str, out_dir: str, mesh, rules, *, step=None, dtype=None):
    """Writes a LoRA workdir's adapters (its latest checkpoint, or `step`) in PEFT's layout.

    Returns:
      (the files written, `base_model_name_or_path`: the HF directory of the workdir's `hf:DIR`
      base, else a note naming the base workdir whose merged export PEFT needs)."""
    from rlhf_jax.infra import checkpoint, restore
    from rlhf_jax.models import config as model_config
    from rlhf_jax.models import hf_peft

    meta = checkpoint.read_meta(workdir, step) or {}
    if "model" not in meta:
        raise ValueError(f"checkpoint in {workdir} has no model config in its meta")
    try:  # before any restore: a model PEFT cannot hold is refused at once
        hf_peft.check(model_config.ModelConfig(**meta["model"]))
    except ValueError as e:
        raise ValueError(f"export --adapters-only of {workdir}: {e}") from None
    cfg, trainable, meta = restore.restore_trainable(workdir, mesh, rules, step)
    src = (meta.get("lora") or {}).get("base", "")
    if hf_init.is_hf_path(src):
        base = os.path.abspath(hf_init.hf_dir(src))
    elif src:
        base = (
            f"not a Hugging Face model: the rlhf_jax workdir {src}; write it with "
            f"`python -m rlhf_jax.tools.convert export --checkpoint {src} --out DIR`"
        )
    else:
        seed = (meta.get("lora") or {}).get("seed", 0)
        base = f"not a Hugging Face model: the seeded init (seed {seed}) of {workdir}'s model"
    files = hf_peft.export_adapters(trainable, cfg, out_dir, base=base, dtype=dtype)
    return files, base


# ----------------------------------------------------------------------------- CLI


def _size(text: str) -> int:
    """'5GB' / '500MB' / '2000' -> bytes."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    text = text.strip().upper()
    unit = next((u for u in units if text.endswith(u)), None)
    try:
        return int(float(text[:-2]) * units[unit]) if unit else int(text)
    except ValueError:
        raise ValueError(f"--max-shard-size {text!r} is not a size like 5GB or 500MB") from None


def run(args) -> list[str] | dict:
    from rlhf_jax.infra import mesh as mesh_lib
    from rlhf_jax.infra import sharding

    # Params spread over every device (fsdp), so a model larger than one device still fits.
    mesh = mesh_lib.build_mesh(mesh_lib.config(data=1, fsdp=-1))
    rules = sharding.DEFAULT_RULES
    if args.command == "import":
        meta = import_to_workdir(
            args.hf,
            args.out,
            mesh,
            rules,
            dtype=args.dtype,
            param_dtype=args.param_dtype,
            scan_layers=args.scan_layers,
        )
        m = meta["model"]
        print(
            f"imported {meta['hf']['model_type']} ({m['family']}, {m['n_layers']} layers, "
            f"d_model {m['d_model']}, vocab {m['vocab_size']}) -> {args.out}; "
            f"use it as init_from={args.out}",
            flush=True,
        )
        return meta
    if args.adapters_only:
        files, base = export_adapters(
            args.checkpoint, args.out, mesh, rules, step=args.step, dtype=args.dtype
        )
        print(
            f"exported the adapters of {args.checkpoint} -> {args.out} ({len(files)} files); "
            f"their base: {base}",
            flush=True,
        )
        return files
    files = export_workdir(
        args.checkpoint,
        args.out,
        mesh,
        rules,
        step=args.step,
        dtype=args.dtype,
        max_shard_bytes=_size(args.max_shard_size),
    )
    print(f"exported {args.checkpoint} -> {args.out} ({len(files)} files)", flush=True)
    return files


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rlhf_jax.tools.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF model directory -> rlhf_jax workdir")
    imp.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    imp.add_argument("--out", required=True, help="workdir to write (use it as init_from)")
    imp.add_argument("--dtype", default="bfloat16", help="compute dtype recorded in the meta")
    imp.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    imp.add_argument("--scan-layers", action="store_true", help="stack layers (model.scan_layers)")
    exp = sub.add_parser("export", help="rlhf_jax workdir -> HF model directory")
    exp.add_argument("--checkpoint", required=True, help="stage workdir (or its checkpoints/)")
    exp.add_argument("--out", required=True, help="HF directory to write")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    exp.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    exp.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    exp.add_argument(
        "--adapters-only",
        action="store_true",
        help="a LoRA workdir's adapters alone, unmerged, in PEFT's layout",
    )
    return p.parse_args(argv)


def main(argv=None):
    return cli.run_or_exit(run, parse_args(argv))


if __name__ == "__main__":
    main()
