"""Text processing for a model: its tokenizer and chat template, and the parity probe.

- :mod:`.tokenizer`: :class:`ModelTokenizer` from a local Hugging Face folder; long inputs are
  encoded off the event loop.
- :mod:`.chat_template`: :class:`ChatTemplate`, transformers-compatible rendering in a jinja2
  sandbox, with vLLM's request normalisation in front of it.
- :mod:`.parity`: probe conversations and the token-for-token comparison against a worker's
  ``/tokenize``.
"""

from .chat_template import ChatTemplate as ChatTemplate
from .chat_template import ChatTemplateConfigError as ChatTemplateConfigError
from .chat_template import ChatTemplateError as ChatTemplateError
from .chat_template import ContentFormat as ContentFormat
from .chat_template import ContentFormatOption as ContentFormatOption
from .chat_template import normalize_messages as normalize_messages
from .chat_template import normalize_tools as normalize_tools
from .parity import ParityReport as ParityReport
from .parity import ParityVerdict as ParityVerdict
from .parity import Probe as Probe
from .parity import build_probes as build_probes
from .parity import compare_tokens as compare_tokens
from .parity import parse_tokenize_response as parse_tokenize_response
from .parity import skipped as skipped
from .parity import summarize as summarize
from .tokenizer import DEFAULT_OFFLOAD_THRESHOLD_CHARS as DEFAULT_OFFLOAD_THRESHOLD_CHARS
from .tokenizer import AddedTokenInfo as AddedTokenInfo
from .tokenizer import ModelTokenizer as ModelTokenizer
from .tokenizer import PrefixCacheStatistics as PrefixCacheStatistics
from .tokenizer import TokenIdError as TokenIdError
from .tokenizer import TokenizerLoadError as TokenizerLoadError
from .tokenizer import resolve_model_dir as resolve_model_dir
