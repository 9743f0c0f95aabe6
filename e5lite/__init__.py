"""e5lite: a pure-JAX BERT encoder for E5 text embeddings."""

from .config import BertConfig
from .encoder import Encoder, load
from .engine import Engine, embed_batch, embed_packed
from .errors import E5LiteError, ModelNotFoundError, WeightsError
from .evaluate import evaluate_retrieval
from .explain import explain
from .export import save_pretrained
from .model import Params, forward
from .pooling import cls_pool, l2_normalize, mean_pool, pool, pool_segments
from .quantize import quantize_embeddings
from .runtime import enable_compilation_cache, initialize_distributed
from .search import search
from .settings import EngineSettings
from .shards import read_embeddings
from .weights import load_params

__version__ = "0.1.0"
__all__ = [
    "BertConfig",
    "Encoder",
    "Engine",
    "EngineSettings",
    "E5LiteError",
    "ModelNotFoundError",
    "Params",
    "WeightsError",
    "cls_pool",
    "embed_batch",
    "embed_packed",
    "enable_compilation_cache",
    "forward",
    "initialize_distributed",
    "l2_normalize",
    "load",
    "load_params",
    "mean_pool",
    "pool",
    "pool_segments",
    "quantize_embeddings",
    "read_embeddings",
    "save_pretrained",
    "search",
    "evaluate_retrieval",
    "explain",
]
