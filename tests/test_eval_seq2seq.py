"""scripts/eval.py on encoder-decoder models: a tiny Marian and a tiny T5 saved to folders (offline
byte tokenizer), translation scored with sacrebleu, summarization with ROUGE, --compare with stock."""

import argparse

import pytest
import torch
import transformers

from hf_paged.evaluation.data import TASKS, apply_task_defaults, bundled_data_files, load_rows, make_samples
from hf_paged.evaluation.model import is_encoder_decoder, load_model
from hf_paged.evaluation.runner import encode_prompts, make_batches, run_batches, stock_cache_bytes
from script_runs import run_eval
from seq2seq_folders import EOS, PAD, byte_seq2seq_tokenizer, save_tiny


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    return {kind: str(save_tiny(kind, tmp_path_factory.mktemp(kind))) for kind in ("marian", "t5")}


def defaults(**flags) -> argparse.Namespace:
    args = argparse.Namespace(task=None, dataset=None, data_files=None, text_column=None, reference_column=None,
                              prompt_template=None, metric=None)
    for name, value in flags.items():
        setattr(args, name, value)
    return args


def test_an_encoder_decoder_model_encodes_the_text_itself_and_translates_by_default():
    args = defaults()
    apply_task_defaults(args, encoder_decoder=True)
    assert (args.task, args.text_column, args.reference_column, args.prompt_template, args.metric) == (
        "translation", "source", "target", "{text}", "sacrebleu")
    args = defaults(task="summarization")
    apply_task_defaults(args, encoder_decoder=True)
    assert (args.text_column, args.reference_column, args.prompt_template, args.metric) == ("document", "summary", "{text}", "rouge")
    args = defaults(data_files=["x.jsonl"], text_column="article")  # the user's data: summarization columns, no causal prompt
    apply_task_defaults(args, encoder_decoder=True)
    assert (args.task, args.text_column, args.prompt_template) == (None, "article", "{text}")
    args = defaults()  # a causal model: the built-in code task, as before
    apply_task_defaults(args, encoder_decoder=False)
    assert (args.task, args.prompt_template) == ("code", TASKS["code"].prompt_template)


@pytest.mark.parametrize("task, columns", [("translation", ("source", "target")), ("summarization", ("document", "summary"))])
def test_the_built_in_data_of_each_task_loads(task, columns):
    rows = load_rows(None, None, None, bundled_data_files(task), "test")
    assert len(rows) >= 8 and set(columns) <= set(rows.column_names)
    assert all(row[columns[0]] and row[columns[1]] for row in rows)


def test_a_long_source_keeps_its_first_tokens_and_its_eos():
    tokenizer = byte_seq2seq_tokenizer()
    text = "abcdefghijklmnopqrstuvwxyz"
    samples = make_samples(_rows([text]), "text", None, "{text}", None)
    full = tokenizer(text)["input_ids"]
    assert full[-1] == EOS and len(full) == 27
    (ids,) = encode_prompts(tokenizer, samples, context=10, max_new_tokens=50, truncate=True, encoder_decoder=True)
    assert ids == full[:9] + [EOS]  # the output goes to the decoder: max_new_tokens takes nothing from the source
    from hf_paged.evaluation import EvalError

    with pytest.raises(EvalError, match="keep its first 10 tokens"):
        encode_prompts(tokenizer, samples, context=10, max_new_tokens=50, truncate=False, encoder_decoder=True)


def _rows(texts: list[str]):
    import datasets

    return datasets.Dataset.from_dict({"text": texts})


def test_stock_kv_bytes_of_an_encoder_decoder_cache_count_self_and_cross_attention():
    self_cache, cross_cache = transformers.DynamicCache(), transformers.DynamicCache()
    self_cache.update(torch.zeros(3, 2, 5, 4), torch.zeros(3, 2, 5, 4), 0)
    cross_cache.update(torch.zeros(3, 2, 7, 4), torch.zeros(3, 2, 7, 4), 0)
    cache = transformers.EncoderDecoderCache(self_cache, cross_cache)
    assert stock_cache_bytes(cache) == 2 * 3 * 2 * (5 + 7) * 4 * 4
    assert stock_cache_bytes(self_cache) == 2 * 3 * 2 * 5 * 4 * 4


@pytest.mark.parametrize("kind", ["marian", "t5"])
def test_stock_side_pads_sources_right_and_returns_only_the_output(folders, kind):
    assert is_encoder_decoder(folders[kind]) and not is_encoder_decoder(None)
    model, tokenizer, _ = load_model(folders[kind], "auto", torch.device("cpu"), None)
    assert tokenizer.padding_side == "right"
    samples = make_samples(_rows(["a short one", "a much longer source sentence"]), "text", None, "{text}", None)
    prompt_ids = encode_prompts(tokenizer, samples, None, 6, False, encoder_decoder=True)
    kwargs = dict(max_new_tokens=6, num_beams=2, num_return_sequences=1, do_sample=False, pad_token_id=PAD)
    records, stats = run_batches(model, tokenizer, make_batches(samples, prompt_ids, 2), kwargs, 0, torch.device("cpu"), "stock", False)
    for record, ids in zip(sorted(records, key=lambda r: r["index"]), prompt_ids):
        padded = torch.full((1, len(ids)), PAD)
        padded[0, :] = torch.tensor(ids)
        expected = model.generate(input_ids=padded, attention_mask=torch.ones_like(padded), **kwargs)[0, 1:].tolist()
        if EOS in expected:
            expected = expected[: expected.index(EOS) + 1]
        assert record["output_ids"] == [expected] and record["prompt_tokens"] == len(ids)
    # the cache generate() returned: 2 inputs x 2 beams of source and output tokens, in 2 decoder layers
    assert stats.peak_kv_bytes > 0


@pytest.mark.parametrize("kind, task, scores", [
    ("marian", "translation", {"bleu", "chrf"}),
    ("t5", "summarization", {"rouge1", "rouge2", "rougeL"}),
])
def test_eval_compares_paged_with_stock_on_a_saved_model(tmp_path, folders, kind, task, scores):
    code, records, summary = run_eval(
        tmp_path, "--model", folders[kind], "--task", task, "--limit", "6", "--batch-size", "3",
        "--max-new-tokens", "12", "--num-beams", "3", "--num-return-sequences", "2", "--page-size", "4", "--compare",
    )
    assert code == 0
    assert summary["data"]["task"] == task and summary["model"] == folders[kind]
    assert set(summary["scores"]) == scores and set(summary["stock"]["scores"]) == scores
    assert summary["agreement"] == 1.0 and all(record["match"] for record in records)
    assert len(records) == 6 and all(len(record["output_ids"]) == 2 for record in records)
    # stock holds every beam's copy of the source's cross-attention K/V; the pool holds it once per input
    assert 0 < summary["peak_kv_bytes"] < summary["stock"]["peak_kv_bytes"]
