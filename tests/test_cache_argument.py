"""The KV cache reaches every model's forward under the name its transformers takes (cache_argument).

transformers 5.24 renamed `past_key_values` to `cache`; a model handed the cache under a name it does
not take would build one of its own and leave ours empty. pyproject's filterwarnings also turns the
old name's FutureWarning into an error anywhere in the suite.
"""

import warnings

import pytest
import torch
from transformers import DynamicCache

from flora_core.cache_argument import cache_kwargs
from tests.factories import TINY_MODELS, VOCAB


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_the_cache_given_is_the_cache_filled_and_read(arch):
    model = TINY_MODELS[arch]().eval()
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model(input_ids=ids[:, :6], **cache_kwargs(model, cache), use_cache=True)
        assert cache.get_seq_length() == 6  # the model wrote our cache, not one of its own
        stepped = model(input_ids=ids[:, 6:], **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
        whole = model(input_ids=ids, use_cache=False).logits[:, -1]
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(stepped, whole, rtol=1e-4, atol=1e-5)  # the step read the first six from it
