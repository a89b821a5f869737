"""hf_ext: methods the Hugging Face ecosystem lacks, as drop-in pieces for transformers and sentence-transformers.

Example:

```python
>>> import hf_ext
>>> from sentence_transformers import SentenceTransformer
>>> model = SentenceTransformer(str(hf_ext.minilm_path()))  # or any Hub id
>>> test = hf_ext.load_stsb("test")
>>> model.encode([test[0]["sentence1"], test[0]["sentence2"]]).shape
(2, 384)

```
"""

from __future__ import annotations

from .accelerate_configs import accelerate_config_names, accelerate_config_path
from .assets import (
    BBC_NEWS_LABELS,
    STSB_SPLITS,
    bbc_news_train_test_split,
    cache_dir,
    load_bbc_news,
    load_stsb,
    minilm_path,
    smollm2_path,
)
from .data import BucketPadCollator, default_buckets
from .distributed import all_gather_with_grad, get_rank, get_world_size, is_distributed
from .losses import CachedCoSENTLoss, CoSENTLoss, CrossEncoderCoSENTLoss, cosent_loss, linear_tvd_loss, tvd_loss
from .optim import ProjectedAdamW, StepInBackward, create_projected_optimizer, estimate_training_memory
from .retrieval import CURIndex
from .trainers import RecompileCounter, TVDConfig, TVDTrainer, tvd_compute_loss_func

__version__ = "0.1.0"

__all__ = [
    "BBC_NEWS_LABELS",
    "STSB_SPLITS",
    "BucketPadCollator",
    "CURIndex",
    "CachedCoSENTLoss",
    "CoSENTLoss",
    "CrossEncoderCoSENTLoss",
    "ProjectedAdamW",
    "RecompileCounter",
    "StepInBackward",
    "TVDConfig",
    "TVDTrainer",
    "__version__",
    "accelerate_config_names",
    "accelerate_config_path",
    "all_gather_with_grad",
    "bbc_news_train_test_split",
    "cache_dir",
    "cosent_loss",
    "create_projected_optimizer",
    "default_buckets",
    "estimate_training_memory",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "linear_tvd_loss",
    "load_bbc_news",
    "load_stsb",
    "minilm_path",
    "smollm2_path",
    "tvd_compute_loss_func",
    "tvd_loss",
]
