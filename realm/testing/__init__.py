"""Helpers for testing code built on Realm: small GGUF models with a real tokenizer.

``write_test_model`` writes a random-weight llama or qwen2 model in any of the weight types
the kernels run; ``write_vocab_only`` writes a tokenizer-only GGUF file.
"""

from .models import ARCHS as ARCHS
from .models import TOKENIZERS as TOKENIZERS
from .models import WEIGHT_TYPES as WEIGHT_TYPES
from .models import write_test_model as write_test_model
from .models import write_vocab_only as write_vocab_only
