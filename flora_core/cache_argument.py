"""How to hand a KV cache to a transformers model's forward: `cache=` from 5.24, `past_key_values=` before.

transformers 5.24 renamed the argument; the old name still works there with a FutureWarning and
goes in 5.40. The engine supports transformers 4.56 and later, so it asks each model's forward
which name it takes, once per model class.

    logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits
"""

from __future__ import annotations

import functools
import inspect

from torch import nn
from transformers import Cache


def cache_kwargs(model: nn.Module, cache: Cache) -> dict[str, Cache]:
    """{name: cache} for `model`'s forward, under the name it takes the KV cache by."""
    return {cache_argument_name(type(model)): cache}


@functools.cache
def cache_argument_name(model_class: type[nn.Module]) -> str:
    """"cache" where the class's forward names that argument (transformers >= 5.24), else "past_key_values"."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
