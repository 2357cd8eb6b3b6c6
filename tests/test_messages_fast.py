"""The positional message constructors equal the dataclass constructors, field for field."""

from __future__ import annotations

import numpy as np
import pytest

from helix_async.codec import decode, encode, wire_size
from helix_async.messages import (
    DecodeWork,
    Feedback,
    PromptWork,
    TokenResult,
    make_decode_work,
    make_feedback,
    make_prompt_work,
    make_token_result,
    positional_constructor,
)

ROUTE = ((3, 0, 10), (7, 10, 80))


@pytest.mark.parametrize(
    ("make", "kw"),
    [
        (
            make_prompt_work,
            PromptWork(request_id=5, query_id=9, route=ROUTE, stage=1, num_tokens=12, token_ids=(), max_tokens=4,
                       sent_at=2.5, payload_bytes=12 * 16384),
        ),
        (
            make_decode_work,
            DecodeWork(request_id=5, route=ROUTE, stage=0, context_len=13, token_id=-1, sent_at=3.0,
                       payload_bytes=4),
        ),
        (
            make_decode_work,
            DecodeWork(request_id=5, route=ROUTE, stage=1, context_len=13, token_id=-1, sent_at=3.0,
                       tensors=(np.arange(8, dtype=np.float16),)),
        ),
        (make_token_result, TokenResult(request_id=5, token_id=0, context_len=13, finished=False, sent_at=4.0, route=ROUTE)),
        (make_feedback, Feedback(request_id=5, node_id=7, delay=0.25, sent_at=4.0)),
    ],
)
def test_positional_equals_keyword(make, kw):
    args = [getattr(kw, name) for name in type(kw).FIELDS]
    fast = make(*args)
    assert type(fast) is type(kw)
    assert fast == kw
    assert repr(fast) == repr(kw)
    assert wire_size(fast) == wire_size(kw)
    assert decode(encode(fast)) == kw
    with pytest.raises(AttributeError):
        fast.request_id = 2  # still frozen


def test_positional_constructor_takes_exactly_the_fields():
    make = positional_constructor(Feedback)
    with pytest.raises(TypeError):
        make(1, 2, 0.5)  # one field missing: no defaults
    assert make.__name__ == "make_feedback"
