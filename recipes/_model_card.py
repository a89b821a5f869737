"""What the recipes' model cards share: the base model a card records, and the Hub metadata of a transformers model.

The recipes run as ``accelerate launch recipes/NAME.py``, so this folder is on ``sys.path`` and
``from _model_card import ...`` works (as ``_common`` does for the benchmarks).

Example:

```python
>>> from _model_card import MINILM_HUB_ID, base_model_id
>>> base_model_id(None, MINILM_HUB_ID), base_model_id("BAAI/bge-small-en-v1.5", MINILM_HUB_ID)
('sentence-transformers/all-MiniLM-L6-v2', 'BAAI/bge-small-en-v1.5')
```
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

# The Hub ids of the embedded defaults (`hf_ext.minilm_path()`, `hf_ext.smollm2_path()`): a card records the model
# the offline copy is a copy of, not the local folder it was loaded from.
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# (pipeline tag, task name) of the model-index results, by recipe task.
_TASKS = {"classification": ("text-classification", "Text Classification"),
          "causal_lm": ("text-generation", "Text Generation")}  # fmt: skip


def base_model_id(model_name_or_path: str | None, embedded_hub_id: str) -> str | None:
    """The Hub id a card records as its base model: the embedded default's when ``model_name_or_path`` is None, else
    the id given; None for a local folder (a path is no Hub id, and the folder does not say which model it holds)."""
    if model_name_or_path is None:
        return embedded_hub_id
    return None if Path(model_name_or_path).exists() else model_name_or_path


def base_model_text(model_name_or_path: str | None, embedded_hub_id: str) -> str:
    """The card's "Base model" entry: the Hub id, linked (and said to be the embedded copy), or the local folder."""
    hub_id = base_model_id(model_name_or_path, embedded_hub_id)
    if hub_id is None:
        return f"`{model_name_or_path}` (a local folder: no Hub id to record)"
    link = f"[{hub_id}](https://huggingface.co/{hub_id})"
    return f"{link} (embedded offline copy)" if model_name_or_path is None else link


def transformers_card_metadata(
    *, base_model: str | None, model_name: str, task: str, tags: list[str], dataset_name: str, metrics: dict
) -> str:
    """The YAML metadata of a transformers model's card (without the ``---`` lines): its base model (omitted when
    None), and each test metric of ``metrics`` (name -> number) once in the model-index."""
    pipeline_tag, task_name = _TASKS[task]
    results = [
        EvalResult(task_type=pipeline_tag, task_name=task_name, dataset_type="bbc_news", dataset_name=dataset_name,
                   dataset_split="test", metric_type=name, metric_value=float(value))  # numpy floats are not YAML
        for name, value in metrics.items()
    ]  # fmt: skip
    data = ModelCardData(base_model=base_model, library_name="transformers", pipeline_tag=pipeline_tag,
                         tags=["hf_ext", *tags], model_name=model_name, eval_results=results)  # fmt: skip
    return data.to_yaml()
