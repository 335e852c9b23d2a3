"""scripts/generation_tests.py, the harness that runs transformers' generation tests on wrapped
models, checked on a stand-in checkout (transformers' own test files are not in its wheel or sdist,
so CI does not run them: docs/generation-tests.md)."""

import textwrap

import pytest

from script_runs import ROOT, load_script

harness = load_script(ROOT / "scripts" / "generation_tests.py", "hf_paged_generation_tests")

STAND_IN = '''
import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache


def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


INPUT = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.generate
def test_right_padding_greedy():
    mask = torch.tril(torch.ones(2, 6, dtype=torch.long))[-2:]
    out = model().generate(INPUT, attention_mask=mask, max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (2, 9)


@pytest.mark.generate
def test_returned_cache_is_a_dynamic_cache():
    out = model().generate(INPUT, max_new_tokens=2, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, DynamicCache)


@pytest.mark.generate
def test_fails_on_stock_too():
    assert False, "stock fails this one"


def test_not_a_generation_test():
    pass
'''


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_harness_reports_what_fails_wrapped_only(tmp_path):
    test_file = tmp_path / "tests" / "models" / "llama" / "test_modeling_llama.py"
    test_file.parent.mkdir(parents=True)
    test_file.write_text(textwrap.dedent(STAND_IN))
    result = harness.compare("llama", tmp_path, [], twin=True)
    assert result["collected"] == 3  # `-m generate` only
    assert result["stock_passed"] == 2 and result["wrapped_passed"] == 1
    assert list(result["fail_wrapped_only"]) == ["test_modeling_llama::test_returned_cache_is_a_dynamic_cache"]
    assert result["twin_log"] == []  # every call's tokens were stock's
    assert "| llama | 3 | 2 | 1 | 1 |" in harness.markdown([result])
