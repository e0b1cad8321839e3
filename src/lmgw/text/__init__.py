"""Text processing for a model: its tokenizer and chat template, and the parity probe.

- :mod:`.tokenizer`: :class:`ModelTokenizer` from a local Hugging Face folder; long inputs are
  encoded off the event loop.
- :mod:`.chat_template`: :class:`ChatTemplate`, transformers-compatible rendering in a jinja2
  sandbox, with vLLM's request normalisation in front of it.
- :mod:`.parity`: probe conversations and the token-for-token comparison against a worker's
  ``/tokenize``.
"""

from .tokenizer import (
    DEFAULT_OFFLOAD_THRESHOLD_CHARS as DEFAULT_OFFLOAD_THRESHOLD_CHARS,
)
from .tokenizer import AddedTokenInfo as AddedTokenInfo
from .tokenizer import ModelTokenizer as ModelTokenizer
from .tokenizer import TokenIdError as TokenIdError
from .tokenizer import TokenizerLoadError as TokenizerLoadError
from .tokenizer import resolve_model_dir as resolve_model_dir
