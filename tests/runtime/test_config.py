import dataclasses
import re

import pytest

from fxforge.runtime.config import EngineConfig


@pytest.mark.parametrize(
    "field, value, message",
    [("max_num_seqs", 0, "EngineConfig.max_num_seqs must be an int >= 1, got 0"),
     ("max_num_batched_tokens", 0, "EngineConfig.max_num_batched_tokens must be an int >= 1, got 0"),
     ("max_model_len", 1, "EngineConfig.max_model_len must be an int >= 2, got 1"),
     ("page_size", 0, "EngineConfig.page_size must be an int >= 1, got 0"),
     ("num_pages", 0, "EngineConfig.num_pages must be an int >= 1, got 0"),
     ("num_pages", 2.0, "EngineConfig.num_pages must be an int >= 1, got 2.0"),
     ("num_decode_steps", True, "EngineConfig.num_decode_steps must be an int >= 1, got True"),
     ("enable_chunked_prefill", 1, "EngineConfig.enable_chunked_prefill must be a bool, got 1"),
     ("use_cuda_graphs", "auto", "EngineConfig.use_cuda_graphs must be a bool, got 'auto'"),
     ("chat", None, "EngineConfig.chat must be a bool, got None"),
     ("eos_token_id", -1, "EngineConfig.eos_token_id must be None or an int >= 0, got -1"),
     ("eos_token_id", "2", "EngineConfig.eos_token_id must be None or an int >= 0, got '2'")],
    ids=["no_seats", "no_budget", "len_1", "page_0", "no_pages", "float_pages", "bool_steps", "int_chunked",
         "str_graphs", "none_chat", "negative_eos", "str_eos"],
)
def test_bad_field_named_with_its_valid_range(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineConfig(**{field: value})


def test_whole_prefill_must_fit_without_chunking():
    with pytest.raises(ValueError, match="max_model_len - 1 = 199 tokens .* max_num_batched_tokens is 100"):
        EngineConfig(max_num_batched_tokens=100, max_model_len=200, enable_chunked_prefill=False)
    assert EngineConfig(max_num_batched_tokens=199, max_model_len=200, enable_chunked_prefill=False)


def test_frozen_and_closed():
    config = EngineConfig(eos_token_id=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.page_size = 8
    with pytest.raises(TypeError, match="block_size"):
        EngineConfig(block_size=16)
    with pytest.raises(ValueError, match="EngineConfig.page_size"):
        dataclasses.replace(config, page_size=-4)  # derived configs are validated too
