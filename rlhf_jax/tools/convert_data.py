"""Preference data as published -> the project's comparisons JSONL: the convert_data tool.

  python -m rlhf_jax.tools.convert_data --in hh_train.parquet --out comparisons.jsonl

Every input row is read as the reward-model stage reads it (data/pref_formats.py: HH-RLHF
transcripts, message-list pairs, scored K-way rows, or rows already in the project's form; JSONL
or Parquet by extension) and checked the same way, so a bad row stops the tool with one line
naming the file, row and field, and what it writes is exactly what `data.train` would train on.
Pairs are written as `{"prompt" | "messages", "chosen", "rejected"}`, larger K as `{...,
"responses", "ranking"}`. Rows that tie every response are skipped and counted, as the stage does.

  python -m rlhf_jax.tools.convert_data --in hh_train.parquet --out demos.jsonl --demos

writes instead each comparison's best response (the first of them when several tie for best) as
an SFT demonstration, `{"prompt", "response"}` or `{"messages"}` ending with it, for the common
recipe of fine-tuning on the chosen answers before training the RM.

The stage reads the published files directly too; converting once is for inspecting the data,
sharing it, or skipping the conversion on every run.
"""

from __future__ import annotations

import argparse
import collections

from rlhf_jax.data import chat, lm_data, pref_formats, rm_data
from rlhf_jax.infra import cli


def demo_row(comp: dict) -> dict:
    """A normalised comparison -> an SFT demonstration of its best response."""
    prompt, best = comp["prompt"], comp["responses"][comp["ranks"].index(0)]
    if isinstance(prompt, str):
        return {"prompt": prompt, "response": best}
    return {"messages": chat.to_json((*prompt, ("assistant", best)))}


def convert(paths: list[str], out: str, k_max: int = 9, demos: bool = False) -> dict:
    """Reads comparisons from `paths` (files or globs) and writes them to `out` as JSONL: as
    comparisons, or with `demos` as a demonstration of each one's best response.

    Returns:
      Counts: {"comparisons": written, "all_tie_skipped": rows without a ranked pair,
      "k_histogram": {K: comparisons}, "per_file": {path: comparisons}}.
    """
    skipped = collections.Counter()
    comps = rm_data.read_comparisons(paths, k_max=k_max, skipped=skipped)
    if not comps:
        raise ValueError(
            f"no comparisons in {paths!r} ({skipped['all_tie']} all-tie rows skipped); "
            "nothing to write"
        )
    row = demo_row if demos else pref_formats.comparison_row
    lm_data.write_jsonl(out, [row(c) for c in comps])
    per_file = collections.Counter(c["source"].rsplit(":", 1)[0] for c in comps)
    return {
        "comparisons": len(comps),
        "all_tie_skipped": skipped["all_tie"],
        "k_histogram": dict(sorted(collections.Counter(len(c["ranks"]) for c in comps).items())),
        "per_file": dict(per_file),
    }


def run(args) -> dict:
    counts = convert(args.inputs, args.out, k_max=args.k_max, demos=args.demos)
    for path, n in counts["per_file"].items():
        print(f"{path}: {n} comparisons", flush=True)
    what = "demonstrations from comparisons" if args.demos else "comparisons"
    ks = ", ".join(f"K={k}: {n}" for k, n in counts["k_histogram"].items())
    print(
        f"wrote {counts['comparisons']} {what} ({ks}) to {args.out}; skipped "
        f"{counts['all_tie_skipped']} all-tie rows",
        flush=True,
    )
    return counts


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rlhf_jax.tools.convert_data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--in",
        dest="inputs",
        action="append",
        required=True,
        help="input file or glob (.jsonl, .parquet); repeat for several",
    )
    p.add_argument("--out", required=True, help="comparisons JSONL to write")
    p.add_argument("--k-max", type=int, default=9, help="most responses a comparison may have")
    p.add_argument(
        "--demos", action="store_true", help="write each best response as an SFT demonstration"
    )
    return p.parse_args(argv)


def main(argv=None):
    return cli.run_or_exit(run, parse_args(argv))


if __name__ == "__main__":
    main()
