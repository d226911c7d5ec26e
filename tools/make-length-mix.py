#!/usr/bin/env python3
"""Instruction data whose example lengths follow the real datasets', from the bundled texts.

Writes two Parquet files in the exact column layouts laco-train reads:
  OUT/alpaca-lengths.parquet    tatsu-lab/alpaca layout (instruction, input, output, text)
  OUT/openorca-lengths.parquet  Open-Orca/OpenOrca layout (id, system_prompt, question, response)

The words come from the bundled public-domain texts (Milton's Areopagitica, the 1911
Britannica article on Shakespeare, and the plays' lines in the bundled instruction files;
Hamlet, the held-out evaluation text, is never used). The lengths, in words, are drawn from
log-normal distributions set to the datasets' published summary statistics, as far as they are
known here (this machine cannot download the datasets to fit them):

  alpaca    instruction: median 12 words (sigma 0.45); input: present in 40% of examples,
            median 14 words (sigma 0.9); output: median 30 words (sigma 1.0), at most 900
            (tatsu-lab/alpaca: outputs mostly one or two sentences, a long tail of lists and
            essays; about 60% of examples have no input)
  openorca  system prompt: one of the Orca paper's system messages (about 1 in 6 empty);
            question: median 85 words (sigma 1.0), at most 2500 (FLAN tasks, often with a
            passage); response: median 95 words (sigma 0.85), at most 1500 (GPT-4 and
            GPT-3.5 step-by-step explanations)

Usage (pyarrow in a virtual environment):
  python3 -m venv .venv && .venv/bin/pip install pyarrow
  .venv/bin/python tools/make-length-mix.py --out runs/lengths [--examples 2000] [--seed 0]
"""
import argparse
import os
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATASETS = os.path.join(ROOT, "datasets")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# System messages of the Orca paper (Mukherjee et al. 2023, table 2), as OpenOrca uses them.
SYSTEM_PROMPTS = [
    "You are an AI assistant. User will you give you a task. Your goal is to complete the task "
    "as faithfully as you can. While performing the task think step-by-step and justify your steps.",
    "You are a helpful assistant, who always provide explanation. Think like you are answering "
    "to a five year old.",
    "You are an AI assistant that helps people find information.",
    "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
    "You should describe the task and explain your answer. While answering a multiple choice "
    "question, first output the correct answer(s). Then explain why other answers are wrong. "
    "Think like you are answering to a five year old.",
    "Explain how you used the definition to come up with the answer.",
    "User will you give you a task with some instruction. Your job is follow the instructions as "
    "faithfully as you can. While answering think step-by-step and justify your answer.",
    "You are a teacher. Given a task, you explain in simple steps what the task is asking, any "
    "guidelines it provides and how to use those guidelines to find the answer.",
    "You are an AI assistant that follows instruction extremely well. Help as much as you can.",
]


def corpus():
    """The bundled texts as one list of words (Hamlet left out)."""
    words = []
    for name in ["text_milton_areopagitica.txt", "text_britannica1911_shakespeare_article.txt"]:
        with open(os.path.join(DATASETS, name), encoding="utf-8") as f:
            words += f.read().split()
    for name, cols in [
        ("alpaca-format-shakespeare.parquet", ["instruction", "input", "output"]),
        ("openorca-format-shakespeare.parquet", ["question", "response"]),
    ]:
        table = pq.read_table(os.path.join(DATASETS, name), columns=cols)
        for col in cols:
            for text in table.column(col).to_pylist():
                words += text.split()
    return words


def lognormal(rng, median, sigma, lo, hi):
    return max(lo, min(hi, round(rng.lognormvariate(0.0, sigma) * median)))


def passage(rng, words, n):
    """n consecutive words from a random place in the corpus."""
    start = rng.randrange(0, len(words) - n - 1)
    text = " ".join(words[start : start + n])
    return re.sub(r"\s+", " ", text).strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--examples", type=int, default=2000, help="examples per file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    words = corpus()
    os.makedirs(args.out, exist_ok=True)

    rows = {"instruction": [], "input": [], "output": [], "text": []}
    for _ in range(args.examples):
        instruction = passage(rng, words, lognormal(rng, 12, 0.45, 3, 120))
        inp = passage(rng, words, lognormal(rng, 14, 0.9, 1, 600)) if rng.random() < 0.4 else ""
        output = passage(rng, words, lognormal(rng, 30, 1.0, 1, 900))
        template = ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT
        prompt = template.replace("{instruction}", instruction).replace("{input}", inp)
        for k, v in zip(rows, [instruction, inp, output, prompt + output]):
            rows[k].append(v)
    pq.write_table(pa.table(rows), os.path.join(args.out, "alpaca-lengths.parquet"))

    rows = {"id": [], "system_prompt": [], "question": [], "response": []}
    for i in range(args.examples):
        system = SYSTEM_PROMPTS[rng.randrange(len(SYSTEM_PROMPTS))] if rng.random() > 1 / 6 else ""
        question = passage(rng, words, lognormal(rng, 85, 1.0, 3, 2500))
        response = passage(rng, words, lognormal(rng, 95, 0.85, 1, 1500))
        for k, v in zip(rows, [f"lengths.{i}", system, question, response]):
            rows[k].append(v)
    pq.write_table(pa.table(rows), os.path.join(args.out, "openorca-lengths.parquet"))
    print(f"wrote {args.examples} examples to each of {args.out}/alpaca-lengths.parquet and "
          f"{args.out}/openorca-lengths.parquet")


if __name__ == "__main__":
    main()
