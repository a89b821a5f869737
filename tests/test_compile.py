"""torch.compile discipline: no graph breaks in hf_ext's hot paths, and length buckets bound the compilations."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_ext.assets import load_bbc_news, minilm_path
from hf_ext.data import BucketPadCollator
from hf_ext.generation import NBCELogitsProcessor, nbce_combine
from hf_ext.losses import cosent_loss, tvd_loss
from hf_ext.trainers import RecompileCounter, compiled_graphs


def _breaks(fn, *args) -> tuple[int, list[str]]:
    dynamo.reset()
    explanation = dynamo.explain(fn)(*args)
    return explanation.graph_break_count, [str(reason.reason)[:200] for reason in explanation.break_reasons]


@pytest.mark.parametrize("with_groups", [False, True])
def test_cosent_loss_compiles_without_graph_breaks(with_groups: bool) -> None:
    scores, labels = torch.randn(32, requires_grad=True), torch.rand(32)
    groups = torch.randint(0, 4, (32,))
    fn = (lambda s, y, g: cosent_loss(s, y, groups=g)) if with_groups else (lambda s, y, g: cosent_loss(s, y))
    assert _breaks(fn, scores, labels, groups) == (0, [])


def test_tvd_loss_compiles_without_graph_breaks() -> None:
    logits, labels = torch.randn(2, 9, 50, requires_grad=True), torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    assert _breaks(lambda x, y: tvd_loss(x, y, gamma=0.5, min_weight=0.2), logits, labels) == (0, [])


@pytest.mark.parametrize("pooling", ["entropy", "mean", "max"])
def test_nbce_processor_compiles_without_graph_breaks(pooling: str) -> None:
    processor = NBCELogitsProcessor(pooling=pooling)
    input_ids, scores = torch.randint(0, 100, (5, 7)), torch.randn(5, 100)
    assert _breaks(processor, input_ids, scores) == (0, [])
    assert _breaks(lambda x: nbce_combine(x, previous=torch.tensor(2)), scores) == (0, [])


def test_nbce_processor_compiled_gives_the_eager_tokens() -> None:
    scores = [torch.randn(4, 60, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    ids = torch.randint(0, 60, (4, 3))
    outputs = {}
    for name in ("eager", "compiled"):
        processor = NBCELogitsProcessor()
        call = torch.compile(processor, backend="eager", fullgraph=True) if name == "compiled" else processor
        picked, step_ids = [], ids
        for step in scores:
            forced = call(step_ids, step)
            token = forced[0].argmax()
            picked.append(int(token))
            step_ids = torch.cat([step_ids, token.expand(4, 1)], dim=1)
        outputs[name] = (picked, processor.chosen_contexts)
    assert outputs["compiled"] == outputs["eager"]


# ------------------------------------------------------------------------------------------- buckets


@pytest.fixture(scope="module")
def title_features() -> list[dict]:
    """50 x 4 real BBC titles (+ body openings of varied length) tokenised: many distinct padded lengths."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    rows = load_bbc_news().shuffle(seed=3).select(range(200))
    texts = [f"{r['title']} {r['text'][: 10 + 23 * (i % 11)]}" for i, r in enumerate(rows)]
    encoded = [tokenizer(text, truncation=True, max_length=64) for text in texts]
    return [{**features, "label": row["label"]} for features, row in zip(encoded, rows, strict=True)]


def _train_compiled(tiny_bert_dir: Path, features: list[dict], collator) -> tuple[int, set[int]]:
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=5)
    dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before, lengths = compiled_graphs(), set()
    for start in range(0, 200, 4):  # 50 batches
        batch = collator(features[start : start + 4])
        lengths.add(batch["input_ids"].shape[1])
        loss = compiled(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return compiled_graphs() - before, lengths


def test_buckets_bound_the_compilations_of_a_compiled_training_run(tiny_bert_dir: Path, title_features) -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    plain = DataCollatorWithPadding(tokenizer)
    bucketed = BucketPadCollator(plain, (16, 32, 64))
    bucketed_count, bucketed_lengths = _train_compiled(tiny_bert_dir, title_features, bucketed)
    free_count, free_lengths = _train_compiled(tiny_bert_dir, title_features, plain)
    assert bucketed_lengths <= {16, 32, 64} and len(free_lengths) > 10
    assert 1 <= bucketed_count <= 3
    assert free_count > bucketed_count
    dynamo.reset()


def test_recompile_counter_warns_without_buckets_and_counts_graphs(tiny_bert_dir, title_features, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=5)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, report_to="none",
                             use_cpu=True, torch_compile=True, torch_compile_backend="eager", logging_steps=4,
                             save_strategy="no", disable_tqdm=True)  # fmt: skip
    counter = RecompileCounter()
    dynamo.reset()
    trainer = Trainer(model=model, args=args, train_dataset=title_features[:32],
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=[counter])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught]
    assert any("not padded to length buckets" in m for m in messages)
    assert counter.count >= 1 and any("compiled_graphs" in entry for entry in trainer.state.log_history)
    dynamo.reset()
