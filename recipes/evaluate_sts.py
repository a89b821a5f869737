"""Evaluate a sentence-transformers model on the STS Benchmark: Spearman of cosine similarity vs gold scores.

Launch (embedded offline MiniLM, STS-B test; prints Spearman ~0.82 and a small table):

    accelerate launch --config_file "$(python -c 'import hf_ext; print(hf_ext.accelerate_config_path("cpu"))')" \
        recipes/evaluate_sts.py

or simply ``python recipes/evaluate_sts.py``. Any Hub id or local folder works in place of the embedded default:

    python recipes/evaluate_sts.py --split validation --model_name_or_path sentence-transformers/all-MiniLM-L6-v2
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sentence_transformers import SentenceTransformer
from transformers import HfArgumentParser

from hf_ext.assets import STSB_SPLITS, load_stsb, minilm_path


@dataclass
class EvaluateSTSArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "SentenceTransformer Hub id or folder. Default: the embedded all-MiniLM-L6-v2."},
    )
    split: str = field(default="test", metadata={"help": f"STS-B split, one of {STSB_SPLITS}."})
    batch_size: int = field(default=64, metadata={"help": "Encoding batch size."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})
    num_examples: int = field(default=5, metadata={"help": "Example pairs printed under the metrics table."})

    def __post_init__(self) -> None:
        if self.split not in STSB_SPLITS:
            raise ValueError(f"`split` must be one of {STSB_SPLITS}, got {self.split!r}.")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {self.batch_size}.")


def main(args: EvaluateSTSArguments) -> dict:
    model_id = args.model_name_or_path or str(minilm_path())
    model = SentenceTransformer(model_id)
    data = load_stsb(args.split)
    start = time.perf_counter()
    # one call for both columns: one progress bar, full batches
    embeddings = model.encode(
        list(data["sentence1"]) + list(data["sentence2"]),
        batch_size=args.batch_size,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=True,
    )
    emb1, emb2 = embeddings[: len(data)], embeddings[len(data) :]
    seconds = time.perf_counter() - start
    cosine = np.sum(emb1 * emb2, axis=1)
    gold = np.asarray(data["score"], dtype=np.float64)
    metrics = {
        "model": args.model_name_or_path or "embedded all-MiniLM-L6-v2",
        "split": args.split,
        "pairs": len(data),
        "spearman": float(spearmanr(cosine, gold).statistic),
        "pearson": float(pearsonr(cosine, gold).statistic),
        "encode_seconds": seconds,
        "sentences_per_second": 2 * len(data) / seconds,
    }
    print(f"\nSTS-B {args.split} Spearman (cosine vs gold): {metrics['spearman']:.4f}\n")
    print(f"| {'split':<10} | {'pairs':>5} | {'Spearman':>8} | {'Pearson':>7} | {'sent/s':>7} |")
    print(f"|{'-' * 12}|{'-' * 7}|{'-' * 10}|{'-' * 9}|{'-' * 9}|")
    print(
        f"| {args.split:<10} | {metrics['pairs']:>5} | {metrics['spearman']:>8.4f} | "
        f"{metrics['pearson']:>7.4f} | {metrics['sentences_per_second']:>7.0f} |\n"
    )
    print(f"| {'gold/5':>6} | {'cosine':>6} | pair")
    for i in range(min(args.num_examples, len(data))):
        print(f"| {gold[i] / 5:>6.2f} | {cosine[i]:>6.2f} | {data['sentence1'][i]!r} / {data['sentence2'][i]!r}")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(EvaluateSTSArguments).parse_args_into_dataclasses()
    main(arguments)
