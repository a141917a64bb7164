"""transformers' mask builders (`sdpa_mask`, `eager_mask`, `flash_attention_mask`) with one signature on every
transformers version we support, so the mask-reading tests run on the declared floor too.

transformers >= 5.4 places the queries with `q_length` and `q_offset`; 5.0-5.3 take their positions as
`cache_position`. The tests call the newer form; on an older transformers it is translated.
"""

import functools
import inspect

import torch
from transformers import masking_utils


def _with_query_length(build):
    if "q_length" in inspect.signature(build).parameters:
        return build

    @functools.wraps(build)
    def positions_from_length(*, q_length, q_offset=0, **kwargs):
        return build(cache_position=torch.arange(q_offset, q_offset + q_length), **kwargs)

    return positions_from_length


sdpa_mask = _with_query_length(masking_utils.sdpa_mask)
eager_mask = _with_query_length(masking_utils.eager_mask)
flash_attention_mask = _with_query_length(masking_utils.flash_attention_mask)
