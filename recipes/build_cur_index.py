"""Build a CUR (ANNCUR) index over a corpus for a cross-encoder, then answer a few queries with it.

Launch (defaults: the unique STS-B train + dev sentences; a cross-encoder trained by
``recipes/train_cosent.py --model_type cross``, or any CrossEncoder folder / Hub id):

    python recipes/build_cur_index.py --cross_encoder outputs/cosent-cross --output_dir outputs/cur-index
    python recipes/build_cur_index.py --cross_encoder cross-encoder/stsb-distilroberta-base \\
        --corpus my_sentences.txt --n_anchor_items 200 --anchor_strategy kmeans

Scoring the anchor queries against every item is the long part (a progress bar; each anchor query's scores on each
block of items are checkpointed under ``<output_dir>/anchor_rows`` so an interrupted build resumes, with any number of
processes). Several processes share it, each scoring a slice of the items (one per GPU, or CPU processes):

    accelerate launch --multi_gpu --num_processes 2 recipes/build_cur_index.py --cross_encoder outputs/cosent-cross
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 recipes/build_cur_index.py  # 2 CPU ranks

The index is saved by rank 0 with ``save_pretrained`` (load it with ``CURIndex.from_pretrained``, which memory-maps
its matrices; ``push_to_hub`` uploads it).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from sentence_transformers import CrossEncoder, SentenceTransformer
from transformers import HfArgumentParser, set_seed

from hf_ext import load_stsb, minilm_path
from hf_ext.distributed import get_rank, get_world_size
from hf_ext.retrieval import CURIndex


@dataclass
class CURRecipeArguments:
    cross_encoder: str | None = field(
        default=None, metadata={"help": "CrossEncoder folder or Hub id. Default: the embedded MiniLM, fresh head."}
    )
    corpus: str | None = field(default=None, metadata={"help": "A text file, one item per line. Default: STS-B."})
    max_items: int | None = field(default=None, metadata={"help": "Use only the first N items."})
    n_anchor_queries: int = field(default=100, metadata={"help": "Anchor queries, drawn from the corpus."})
    n_anchor_items: int = field(default=100, metadata={"help": "Anchor items."})
    anchor_strategy: str = field(default="random", metadata={"help": "`random` or `kmeans` (MiniLM embeddings)."})
    queries: list[str] = field(default_factory=list, metadata={"help": "Queries to answer after building."})
    top_k: int = field(default=5, metadata={"help": "Hits per query."})
    rerank_k: int = field(default=50, metadata={"help": "Items re-scored exactly per query."})
    batch_size: int = field(default=64, metadata={"help": "Cross-encoder batch size."})
    block_size: int = field(default=4096, metadata={"help": "Items per scoring block (what processes split)."})
    output_dir: str = field(default="outputs/cur-index", metadata={"help": "Where the index is saved."})
    seed: int = field(default=0, metadata={"help": "Seed of the anchor draws."})

    def __post_init__(self) -> None:
        if self.max_items is not None and self.max_items < 2:
            raise ValueError(f"`max_items` must be >= 2, got {self.max_items}.")


def load_corpus(args: CURRecipeArguments) -> list[str]:
    if args.corpus is not None:
        path = Path(args.corpus)
        if not path.is_file():
            raise ValueError(f"`corpus` must be a text file with one item per line, got {args.corpus!r}.")
        items = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        items = []
        for split in ("train", "validation"):
            data = load_stsb(split)
            items += list(data["sentence1"]) + list(data["sentence2"])
    items = list(dict.fromkeys(items))
    return items[: args.max_items] if args.max_items else items


def main(args: CURRecipeArguments) -> dict:
    items = load_corpus(args)
    if args.n_anchor_items <= len(items) and args.rerank_k > len(items) - args.n_anchor_items:  # before the build
        others = len(items) - args.n_anchor_items
        raise ValueError(f"`rerank_k` ({args.rerank_k}) exceeds the {others} items that are not anchor items: pass at "
                         f"most {others} (then every item is scored exactly).")  # fmt: skip
    state = PartialState()  # under `accelerate launch`: initialises the process group the build splits its work over
    rank, world_size = get_rank(), get_world_size()  # from torch.distributed, as the build sees it
    set_seed(args.seed)  # a fresh cross-encoder head is then the same on every rank
    cross_encoder = CrossEncoder(args.cross_encoder or str(minilm_path()), num_labels=1, device=str(state.device))
    embedder = SentenceTransformer(str(minilm_path())) if args.anchor_strategy == "kmeans" else None
    output = Path(args.output_dir)
    if rank == 0:
        print(f"{len(items)} items; {args.n_anchor_queries} anchor queries x {len(items)} items to score"
              + (f" by {world_size} processes" if world_size > 1 else ""))  # fmt: skip
    index = CURIndex.build(
        cross_encoder, items, n_anchor_queries=args.n_anchor_queries, query_pool=items,
        n_anchor_items=args.n_anchor_items, anchor_strategy=args.anchor_strategy, embedder=embedder,
        batch_size=args.batch_size, checkpoint_dir=output / "anchor_rows", seed=args.seed, block_size=args.block_size,
    )  # fmt: skip
    results = _save_and_query(index, items, args, output) if rank == 0 else []  # every rank holds the same index
    state.wait_for_everyone()  # then every rank takes the process group down: a rank that exits holding it can abort
    state.destroy_process_group()
    return {"n_items": len(items), "queries": results}


def _save_and_query(index: CURIndex, items: list[str], args: CURRecipeArguments, output: Path) -> list[dict]:
    """Rank 0's part: save the index, answer the example queries, write them next to it."""
    index.save_pretrained(output)
    queries = args.queries or random.Random(args.seed).sample(items, min(3, len(items)))
    hits, calls = index.search(queries, top_k=args.top_k, rerank_k=args.rerank_k)
    results = []
    for query, query_hits, spent in zip(queries, hits, calls, strict=True):
        print(f"\n{query}  ({spent} cross-encoder calls instead of {len(items)})")
        for hit in query_hits:
            print(f"  {hit['score']:8.3f}  {items[hit['corpus_id']]}")
        results.append({"query": query, "hits": query_hits, "calls": spent})
    (output / "example_queries.json").write_text(json.dumps(results, indent=2))
    print(f"\nIndex saved to {output} (CURIndex.from_pretrained({str(output)!r}, cross_encoder=...))")
    return results


if __name__ == "__main__":
    main(*HfArgumentParser(CURRecipeArguments).parse_args_into_dataclasses())
