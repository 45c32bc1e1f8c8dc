"""Models: GGUF files, tokenizers, the forward pass over sessions, registry and layer paging."""

from ._chat import CHATML_TEMPLATE as CHATML_TEMPLATE
from ._default import default_model_path as default_model_path
from ._detok import TokenStream as TokenStream
from ._gguf import ModelInfo as ModelInfo
from ._gguf import content_hash as content_hash
from ._lora import Adapter as Adapter
from ._lora import load_adapter as load_adapter
from ._lora import save_adapter as save_adapter
from ._model import Model as Model
from ._model import Session as Session
from ._model import load_model as load_model
from ._pager import LayerPager as LayerPager
from ._pager import PagerStatistics as PagerStatistics
from ._pager import PagingBudget as PagingBudget
from ._registry import ModelRegistry as ModelRegistry
from ._tokenizer import Tokenizer as Tokenizer
from ._tokenizer import TokenType as TokenType
from ._tokenizer import load_tokenizer as load_tokenizer
