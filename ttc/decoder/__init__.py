"""ttc's built-in KV-cached decoder: model, weights, tokenizer, paged cache, prefix tree, sampling, engine."""

from .cache import KVPool, KVSequence, PoolExhausted
from .config import ModelConfig, UnsupportedModelError
from .engine import Completion, Engine, PromptTooLong, ScoreResult, Sequence
from .model import Transformer
from .sampling import SamplingParams
from .weights import ModelNotFoundError

__all__ = ["KVPool", "KVSequence", "PoolExhausted", "ModelConfig", "UnsupportedModelError", "Completion", "Engine",
           "PromptTooLong", "ScoreResult", "Sequence", "Transformer", "SamplingParams", "ModelNotFoundError"]
