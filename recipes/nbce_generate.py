"""Answer a question from many contexts with NBCE, streaming the answer.

Launch (embedded SmolLM2; without --contexts, a demo over BBC News articles):

    accelerate launch --config_file "$(python -c 'import hf_ext; print(hf_ext.accelerate_config_path("cpu"))')" \\
        recipes/nbce_generate.py

    python recipes/nbce_generate.py --contexts my_docs/ --question "Who signed the agreement?"   # a folder of .txt
    python recipes/nbce_generate.py --contexts docs.jsonl --question "..." --pooling mean        # {"text": ...} lines
    python recipes/nbce_generate.py --model HuggingFaceTB/SmolLM2-1.7B-Instruct --contexts my_docs/ --question "..."
    python recipes/nbce_generate.py --contexts my_docs/ --questions questions.txt   # many questions, contexts read once

A context longer than the model's window is split into overlapping windows (``--window``, ``--overlap``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TextStreamer

from hf_ext import load_bbc_news, smollm2_path
from hf_ext.generation import NBCEContextCache, nbce_generate, split_into_windows

DEMO_QUESTION = "Which company's profits are these articles about, and how much did they rise?"


@dataclass
class NBCERecipeArguments:
    model: str | None = field(default=None, metadata={"help": "Causal LM Hub id or folder. Default: embedded SmolLM2."})
    contexts: str | None = field(
        default=None,
        metadata={"help": "A folder of .txt files or a JSONL file ({'text': ...} per line). Default: BBC demo."},
    )
    question: str | None = field(
        default=None, metadata={"help": "The question (with --contexts: this or --questions)."}
    )
    questions: str | None = field(
        default=None,
        metadata={"help": "A text file with one question per line, all answered over the same contexts: they are "
                  "prefilled once and kept (NBCEContextCache), each question prefills only its own tokens."},
    )  # fmt: skip
    beta: float = field(default=0.25, metadata={"help": "NBCE beta (> -1)."})
    pooling: str = field(default="entropy", metadata={"help": "entropy, mean or max."})
    max_new_tokens: int = field(default=64, metadata={"help": "Answer length limit."})
    window: int | None = field(
        default=None, metadata={"help": "Split contexts longer than this many tokens (default: the model's window)."}
    )
    overlap: int = field(default=64, metadata={"help": "Tokens shared by consecutive windows of a split context."})
    num_demo_contexts: int = field(default=6, metadata={"help": "Demo: number of BBC articles used as contexts."})

    def __post_init__(self) -> None:
        if self.contexts is not None and not (self.question or self.questions):
            raise ValueError("`question` (or `questions`) is required with `contexts`.")
        if self.num_demo_contexts < 1:
            raise ValueError(f"`num_demo_contexts` must be >= 1, got {self.num_demo_contexts}.")


def read_contexts(source: str) -> list[str]:
    path = Path(source)
    if path.is_dir():
        texts = [file.read_text(encoding="utf-8") for file in sorted(path.glob("*.txt"))]
    elif path.is_file() and path.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(f"`contexts` must be a folder of .txt files or a .jsonl file, got {source!r}.")
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ValueError(f"`contexts` {source!r} holds no non-empty text.")
    return texts


def read_questions(source: str) -> list[str]:
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"`questions` must be a text file with one question per line, got {source!r}.")
    questions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not questions:
        raise ValueError(f"`questions` {source!r} holds no question.")
    return questions


def main(args: NBCERecipeArguments) -> str | list[str]:
    """The answer (a list of answers with ``--questions``), each streamed as it is generated."""
    path = args.model or str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if args.contexts is None:
        bbc = load_bbc_news()
        contexts = [f"{bbc[i]['title']}\n{bbc[i]['text'][:1200]}" for i in range(args.num_demo_contexts)]
    else:
        contexts = read_contexts(args.contexts)
    questions = ([args.question] if args.question else []) + (read_questions(args.questions) if args.questions else [])
    questions = questions or [DEMO_QUESTION]
    window = args.window or (model.config.max_position_embeddings - args.max_new_tokens - 64)
    pieces = [piece for text in contexts for piece in split_into_windows(text, tokenizer, window, args.overlap)]
    pieces = list(dict.fromkeys(pieces))  # a repetitive document can give identical windows: one row each is enough
    print(f"{len(contexts)} context(s) -> {len(pieces)} row(s) of at most {window} tokens; "
          f"question{'s' if len(questions) > 1 else ''}: {' | '.join(questions)}\n")  # fmt: skip
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cache = NBCEContextCache(model, tokenizer) if len(questions) > 1 else None
    settings = {"beta": args.beta, "pooling": args.pooling, "max_new_tokens": args.max_new_tokens}
    answers = [
        nbce_generate(model, tokenizer, pieces, question, streamer=streamer, context_cache=cache, **settings)
        for question in questions
    ]
    if cache is None:
        return answers[0]
    print(f"\ncontexts read {cache.reads} time(s) for {len(questions)} questions; kept KV cache "
          f"{cache.nbytes / 2**20:.1f} MiB")  # fmt: skip
    return answers


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(NBCERecipeArguments).parse_args_into_dataclasses()
    main(arguments)
