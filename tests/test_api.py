"""Public API: wrap/unwrap, config, errors, pages returned after every call, the memory bound."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

import hf_paged
from hf_paged import OutOfPagesError, PagedCache, PagedConfig, UnsupportedModelError, _compat
from hf_paged.memory.reservations import num_pages_for

from tiny import padded_prompts, tiny_model


def test_unwrap_restores_the_model_exactly():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = (len(model.model._forward_pre_hooks), len(model.model._forward_hooks))
    implementation = model.config._attn_implementation
    hf_paged.wrap(model, num_pages=16)
    assert model.config._attn_implementation == "hf_paged"
    assert hf_paged.unwrap(model) is model
    assert model.config._attn_implementation == implementation
    assert (len(model.model._forward_pre_hooks), len(model.model._forward_hooks)) == hooks
    assert "generate" not in model.__dict__ and not hasattr(model, "hf_paged_runtime")
    assert not any(hasattr(m, "hf_paged_runtime") for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert hf_paged.unwrap(model) is model  # unwrapping an unwrapped model is a no-op


def test_wrap_twice_is_harmless_and_new_settings_rewrap():
    model = tiny_model("llama")
    hf_paged.wrap(model, num_pages=16)
    pool = model.hf_paged_runtime.pool
    hf_paged.wrap(model, num_pages=16)
    assert model.hf_paged_runtime.pool is pool
    hf_paged.wrap(model, PagedConfig(num_pages=32, page_size=8))
    assert hf_paged.memory_stats(model)["num_pages"] == 32
    assert len(model.model._forward_pre_hooks) == 1
    input_ids, mask = padded_prompts()
    hf_paged.unwrap(model)
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0)
    hf_paged.wrap(model, page_size=8, num_pages=32)
    assert torch.equal(model.generate(input_ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0), expected)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(page_size=0), "page_size"),
        (dict(num_pages=0), "num_pages"),
        (dict(max_memory=1.5), "max_memory"),
        (dict(max_memory=-3), "max_memory"),
        (dict(backend="cuda"), "backend"),
        (dict(cascade="yes"), "cascade"),
    ],
)
def test_bad_config_raises_value_error_with_the_expected_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PagedConfig(**kwargs)


def test_unknown_override_names_the_valid_fields():
    with pytest.raises(TypeError, match="page_size"):
        hf_paged.wrap(tiny_model("llama"), pagesize=8)


def test_pool_sizing_from_a_byte_budget():
    model = hf_paged.wrap(tiny_model("llama"), max_memory=1 << 20, page_size=8)
    stats = hf_paged.memory_stats(model)
    # 2 layers x (K + V) x 8 slots x 2 heads x 16 dims x 4 bytes
    assert stats["page_bytes"] == 2 * 2 * 8 * 2 * 16 * 4
    assert stats["num_pages"] == (1 << 20) // stats["page_bytes"]
    pool = model.hf_paged_runtime.pool.pools[0]
    assert pool.shape == (2, stats["num_pages"] + 1, 8, 2, 16) and pool.dtype == torch.float32


def unsupported_models():
    yield "roformer", lambda: AutoModelForCausalLM.from_config(  # bypasses the interface; no patch
        transformers.RoFormerConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            is_decoder=True,
        )
    ), "attention interface"
    yield "deepseek_v3", lambda: AutoModelForCausalLM.from_config(
        transformers.DeepseekV3Config(
            vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=2, num_experts_per_tok=1,
            first_k_dense_replace=1,
        )
    ), "latent"


@pytest.mark.parametrize("name,build,reason", list(unsupported_models()), ids=lambda x: x if isinstance(x, str) else "")
def test_unsupported_models_are_refused_and_left_untouched(name, build, reason):
    model = build()
    implementation = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match=reason) as info:
        hf_paged.wrap(model, num_pages=8)
    assert type(model).__name__ in str(info.value)
    assert model.config._attn_implementation == implementation
    assert not hasattr(model, "hf_paged_runtime") and "generate" not in model.__dict__


def test_out_of_pages_before_generation_frees_everything_and_the_model_keeps_working():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=4, page_size=4)
    input_ids, mask = padded_prompts(batch=2, length=13, pads=(0, 0))
    with pytest.raises(OutOfPagesError, match=r"needed 6 pages, 4 of 4 free.*num_pages"):
        model.generate(input_ids, attention_mask=mask, num_beams=2, max_new_tokens=4, pad_token_id=0)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    out = model.generate(input_ids[:1, :6], max_new_tokens=4, pad_token_id=0)
    assert out.shape == (1, 10)


def test_out_of_pages_mid_generation_frees_everything():
    model = tiny_model("llama")
    input_ids, mask = padded_prompts(batch=1, length=8, pads=(0,))
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    hf_paged.wrap(model, num_pages=4, page_size=4)
    with pytest.raises(OutOfPagesError):  # 8 + 40 tokens need 12 pages; it runs out at token 9
        model.generate(input_ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40, pad_token_id=0)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    assert torch.equal(model.generate(input_ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0), expected)


def test_no_page_leaks_after_100_calls_failing_ones_included():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=24, page_size=4)
    input_ids, mask = padded_prompts(batch=2, length=9, pads=(0, 3))
    outcomes: dict[int, set[str]] = {kind: set() for kind in range(4)}
    for call in range(100):
        kind = call % 4
        try:
            if kind == 0:
                model.generate(input_ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)
            elif kind == 1:
                model.generate(input_ids, attention_mask=mask, num_beams=3, max_new_tokens=3, pad_token_id=0)
            elif kind == 2:  # too long for the pool: fails at a step
                model.generate(input_ids, attention_mask=mask, num_beams=4, max_new_tokens=30, min_new_tokens=30, pad_token_id=0)
            else:  # bad input raised by transformers inside generate
                model.generate(input_ids, attention_mask=mask, num_beams=2, num_return_sequences=3, pad_token_id=0)
            outcomes[kind].add("returned")
        except (OutOfPagesError, ValueError) as error:
            outcomes[kind].add(type(error).__name__)
        assert hf_paged.memory_stats(model)["pages_in_use"] == 0, f"call {call}"
    # Each kind of call ends the same way every time: no failure leaves state that changes the next.
    assert outcomes == {0: {"returned"}, 1: {"returned"}, 2: {"OutOfPagesError"}, 3: {"ValueError"}}
    blocks = model.hf_paged_runtime.pool.blocks
    assert sorted(blocks.free_page_ids) == list(range(24)) and not any(blocks.ref_counts)


def test_beam_search_pages_stay_within_unique_tokens_plus_one_partial_page_per_row():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=256, page_size=4)
    input_ids, mask = padded_prompts(batch=2, length=14, pads=(0, 5))
    checked = []

    def check(module, args, kwargs, output):
        cache = _compat.find_cache(kwargs)
        tables = cache.tables
        # Tokens stored once however many rows share them, counted token by token here.
        unique = {
            (table[position // tables.page_size], position % tables.page_size)
            for table, num_tokens in zip(tables.page_tables, tables.num_tokens)
            for position in range(num_tokens)
        }
        bound = -(-len(unique) // tables.page_size) + tables.num_rows
        checked.append((tables.blocks.num_used_pages, bound))

    handle = model.register_forward_hook(check, with_kwargs=True)
    try:
        model.generate(input_ids, attention_mask=mask, num_beams=6, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    finally:
        handle.remove()
    assert len(checked) == 13  # the shared prefill and 12 decode steps
    assert all(used <= bound for used, bound in checked), checked
    stats = hf_paged.memory_stats(model)
    unshared = 2 * 6 * num_pages_for(14 + 12, 4)  # what per-beam copies of every row would need
    assert stats["peak_pages_in_use"] == max(used for used, _ in checked)
    assert stats["peak_pages_in_use"] < unshared / 2
    assert stats["peak_shared_pages"] >= num_pages_for(9, 4) + num_pages_for(13, 4) - 2


def test_user_cache_in_own_decode_loop_matches_dynamic_cache():
    model = tiny_model("llama")
    input_ids, mask = padded_prompts(batch=2, length=10, pads=(0, 3))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)

    def decode(cache, steps=6):
        tokens = []
        with torch.no_grad():
            out = model(input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache)
            attention, positions = mask, position_ids[:, -1:]
            for _ in range(steps):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
                attention = torch.cat([attention, torch.ones_like(token)], dim=1)
                positions = positions + 1
                out = model(token, attention_mask=attention, position_ids=positions, past_key_values=cache)
        return torch.cat(tokens, dim=1), out.logits

    expected_tokens, expected_logits = decode(DynamicCache())
    hf_paged.wrap(model, num_pages=64, page_size=4)
    with PagedCache(model) as cache:
        tokens, logits = decode(cache)
        assert cache.get_seq_length() == 16 and cache.tables.num_tokens == [16, 13]
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert hf_paged.memory_stats(model)["pages_in_use"] == 0
    # A wrapped model still serves a stock DynamicCache through the original attention.
    fallback_tokens, fallback_logits = decode(DynamicCache())
    assert torch.equal(fallback_tokens, expected_tokens) and torch.equal(fallback_logits, expected_logits)


def test_returned_cache_stays_open_until_released_and_then_says_so():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, return_dict_in_generate=True, pad_token_id=0)
    assert not out.past_key_values.is_released and out.past_key_values.get_seq_length() == 4
    out.past_key_values.release()
    with pytest.raises(RuntimeError, match="released"):
        out.past_key_values.reorder_cache(torch.tensor([0]))


def test_a_model_saved_and_loaded_from_a_local_folder(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    input_ids, mask = padded_prompts()
    expected = model.generate(input_ids, attention_mask=mask, num_beams=3, max_new_tokens=6, pad_token_id=0)
    hf_paged.wrap(model, num_pages=64)
    got = model.generate(input_ids, attention_mask=mask, num_beams=3, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(got, expected)


def test_batch_repeat_interleave_and_select_indices_match_dynamic_cache():
    model = tiny_model("gpt_neox")
    input_ids, mask = padded_prompts(batch=2, length=7, pads=(0, 2))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)

    def run(cache):
        with torch.no_grad():
            model(input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache)
            cache.batch_repeat_interleave(3)
            cache.batch_select_indices(torch.tensor([5, 0, 3]))
            rows = torch.tensor([1, 0, 1])
            token = torch.tensor([[9], [10], [11]])
            attention = torch.cat([mask[rows], torch.ones(3, 1, dtype=mask.dtype)], dim=1)
            return model(token, attention_mask=attention, position_ids=position_ids[rows, -1:] + 1, past_key_values=cache).logits

    expected = run(DynamicCache())
    hf_paged.wrap(model, num_pages=32, page_size=2)
    with PagedCache(model) as cache:
        torch.testing.assert_close(run(cache), expected, rtol=1e-5, atol=1e-5)


def test_generate_without_attention_mask_matches_stock():
    """Positions come from get_seq_length() when no mask is given: it must exclude the current forward."""
    model = tiny_model("llama")
    input_ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(4))
    expected = model.generate(input_ids, num_beams=3, max_new_tokens=6, pad_token_id=0)
    hf_paged.wrap(model, num_pages=64, page_size=4)
    assert torch.equal(model.generate(input_ids, num_beams=3, max_new_tokens=6, pad_token_id=0), expected)
    with PagedCache(model) as cache, torch.no_grad():
        model(input_ids[:, :5], past_key_values=cache)
        logits = model(input_ids[:, 5:], past_key_values=cache).logits
    hf_paged.unwrap(model)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids).logits[:, 5:], rtol=1e-5, atol=1e-5)


def test_cache_kv_bytes_counts_a_dynamic_caches_keys_and_values():
    from hf_paged.integration.stats import cache_kv_bytes

    cache = DynamicCache()
    assert cache_kv_bytes(cache) == 0
    keys = torch.zeros(3, 2, 5, 8)  # [rows, KV heads, tokens, head dim] float32: 960 bytes
    cache.update(keys, keys.clone(), layer_idx=0)
    cache.update(keys, keys.clone(), layer_idx=1)
    assert cache_kv_bytes(cache) == 2 * 2 * 3 * 2 * 5 * 8 * 4
