"""Models: GGUF files, tokenizers, the forward pass over sessions, registry and layer paging."""

from ._gguf import ModelInfo as ModelInfo
from ._gguf import content_hash as content_hash
from ._model import Model as Model
from ._model import Session as Session
from ._model import load_model as load_model
from ._pager import LayerPager as LayerPager
from ._pager import PagerStatistics as PagerStatistics
from ._registry import ModelRegistry as ModelRegistry
