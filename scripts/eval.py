"""Evaluate a model with and without hf_paged on a dataset: quality, speed, time to first token, KV memory.

    python scripts/eval.py                                    # built-in model and task (no network)
    torchrun --nproc_per_node 2 scripts/eval.py --tp 2        # the same, sharded over 2 processes
    python scripts/eval.py --model gpt2 --dataset cnn_dailymail --dataset-config 3.0.0 \
        --split "test[:200]" --text-column article --reference-column highlights --compare --num-beams 4
    accelerate launch --num_processes 2 scripts/eval.py --model ... --compare   # data parallel
    python scripts/eval.py --model ... --device-map auto      # one model across GPUs
    torchrun --nproc_per_node 2 scripts/eval.py --tp 2 --model ...   # one model sharded (tensor parallel)

Writes samples.jsonl and summary.json to --output-dir and prints a table. Bad input exits with code 2.
"""

import argparse
import gc
import sys

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env

import hf_paged
from hf_paged.config import WINDOW_PAGE_SIZE_RULE
from hf_paged.evaluation import EvalError
from hf_paged.evaluation.args import check_args, parse_memory
from hf_paged.evaluation.data import BUILTIN_TASK, TASKS, USER_DATA, apply_task_defaults, bundled_data_files, load_rows, make_samples
from hf_paged.evaluation.logit_error import combine, fp32_copy, fp32_paths, mean_abs_error
from hf_paged.evaluation.metrics import check_available, parse_metrics
from hf_paged.evaluation.model import (
    DTYPES, context_length, input_device, is_encoder_decoder, load_model, parse_device_map, pool_placement,
)
from hf_paged.evaluation.report import agreement, ratios, summarize, table, write_outputs
from hf_paged.evaluation.runner import RunStats, encode_prompts, make_batches, run_batches, warm_up

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group(
        "data (default: the built-in task, completing 40 held-out stdlib functions from their signature and docstring)"
    )
    data.add_argument(
        "--task", choices=sorted(TASKS),
        help="the built-in data of this task without --dataset/--data-files (code: the default; translation "
        "(16 English-German pairs, sacrebleu) and summarization (8 news paragraphs, ROUGE): for encoder-decoder "
        "models, translation by default), and the column and metric defaults for the user's data",
    )
    data.add_argument("--dataset", help="hub dataset name, e.g. cnn_dailymail")
    data.add_argument("--dataset-config", help="hub dataset config, e.g. 3.0.0")
    data.add_argument("--split", help='split or slice, e.g. "test[:200]" (default: test, also for the built-in data; train for --data-files)')
    data.add_argument("--data-files", nargs="+", metavar="FILE", help="local .json/.jsonl/.csv/.parquet files")
    data.add_argument(
        "--text-column", help=f"column holding the input text (default: {USER_DATA.text_column}; built-in task: "
        f"{BUILTIN_TASK.text_column})"
    )
    data.add_argument(
        "--reference-column", help=f"column holding the reference output, '' for none (default: "
        f"{USER_DATA.reference_column}; built-in task: {BUILTIN_TASK.reference_column})"
    )
    data.add_argument(
        "--prompt-template", help=f"format string; {{text}} and any column (default: {USER_DATA.prompt_template!r}; "
        f"built-in task: {BUILTIN_TASK.prompt_template!r}; encoder-decoder models: '{{text}}', the source itself)"
    )
    data.add_argument("--limit", type=int, help="use only the first N rows")
    data.add_argument("--truncate", action="store_true", help="keep the last tokens of prompts too long for the context")
    model = parser.add_argument_group(
        "model (default: the trained default model, a small Llama on the stdlib's source: docs/default_model.md)"
    )
    model.add_argument(
        "--model", help="local folder or hub name (AutoModelForCausalLM, or AutoModelForSeq2SeqLM for an "
        "encoder-decoder model such as T5, BART or Marian; + AutoTokenizer)"
    )
    model.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="weights dtype (default: auto)")
    model.add_argument("--device", help="e.g. cpu, cuda:0 (default: this process's accelerate device)")
    model.add_argument("--device-map", help='auto, balanced, sequential, a device, or JSON {"module": device}')
    model.add_argument(
        "--tp", type=int, default=1,
        help="tensor parallelism: shard the model over this many launched processes (transformers' "
        "DistributedConfig(tp_size=N)); launch N with torchrun --nproc_per_node N or accelerate launch "
        "--num_processes N (default: 1, no sharding)",
    )
    model.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: torch's; 1 for the built-in model; 0: torch's)"
    )
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--num-beams", type=int, default=1)
    gen.add_argument("--num-return-sequences", type=int, default=1)
    gen.add_argument("--do-sample", action="store_true")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--length-penalty", type=float, default=1.0)
    gen.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call, batched by length")
    gen.add_argument("--seed", type=int, default=0, help="batch i samples with seed + i")
    paging = parser.add_argument_group("paging")
    paging.add_argument("--page-size", type=int, default=16)
    paging.add_argument(
        "--window-page-size", type=int,
        help="page size of sliding-window layers (PagedConfig.window_page_size). Default " + WINDOW_PAGE_SIZE_RULE,
    )
    paging.add_argument("--num-pages", type=int, help="pages in the pool (overrides --max-memory)")
    paging.add_argument("--max-memory", help="pool budget: bytes (e.g. 2GiB) or a fraction of free memory (e.g. 0.5)")
    paging.add_argument("--backend", default="auto", choices=("auto", "torch", "flashinfer"))
    paging.add_argument("--no-cascade", action="store_true", help="disable shared-prefix attention")
    paging.add_argument("--compile", action="store_true", help="compile decode steps")
    paging.add_argument(
        "--prefix-cache", action="store_true",
        help="keep prompt pages across batches and reuse shared prefixes (PagedConfig(prefix_cache=True))",
    )
    paging.add_argument(
        "--kv-cache-dtype", default="auto", choices=("auto", "fp8_e4m3", "fp8_e5m2"),
        help="what pages store K/V in (PagedConfig.kv_cache_dtype): auto (the model's dtype) or fp8, half the "
        "bytes of bf16 pages (docs/fp8.md)",
    )
    report = parser.add_argument_group("report")
    report.add_argument(
        "--compare", action="store_true",
        help="also run the unwrapped model and report agreement (in fp16/bf16 also stock's eager vs sdpa agreement "
        "and each one's logit error against an fp32 copy of the model)",
    )
    report.add_argument(
        "--metric", help=f"rouge, bleu, chrf, sacrebleu (= bleu,chrf), first_line (exact match), comma-separated "
        f"(default: {USER_DATA.metric}; built-in task: {BUILTIN_TASK.metric})"
    )
    report.add_argument(
        "--no-logit-error", action="store_true",
        help="with --compare in fp16/bf16, skip the logit error against fp32 (it holds an fp32 copy of the model)",
    )
    report.add_argument("--output-dir", help="write samples.jsonl and summary.json here")
    report.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up generate()")
    return parser


def generate_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    """Keyword arguments of every generate() call (only those that apply to the chosen mode)."""
    kwargs = {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "num_return_sequences": args.num_return_sequences,
        "do_sample": args.do_sample,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    if args.num_beams > 1:
        kwargs["length_penalty"] = args.length_penalty
    return kwargs


PREFIX_COUNTERS = ("prefix_lookup_tokens", "prefix_hits", "prefix_hit_tokens", "prefix_evictions")


def prefix_cache_counts(before: dict, after: dict) -> dict[str, int]:
    """What the prefix cache counted during the timed run (the warm-up's own hits left out)."""
    return {key: after[key] - before[key] for key in PREFIX_COUNTERS if key in after}


def prefix_cache_summary(counts: list[dict[str, int]]) -> dict:
    """The processes' counters added up, and the hit rate: prompt tokens found / tokens that could be."""
    total = {key: sum(c.get(key, 0) for c in counts) for key in PREFIX_COUNTERS}
    looked_up = total["prefix_lookup_tokens"]
    return {"hit_rate": total["prefix_hit_tokens"] / looked_up if looked_up else 0.0, **total}


def run_other_attention(args, model, tokenizer, batches, kwargs, device, show) -> tuple[list[str], list[dict]] | None:
    """With --compare in half precision: the unwrapped model again with its other attention
    implementation (eager for sdpa, sdpa for eager). Rounding makes stock's two implementations
    disagree on some tokens too; the report puts their agreement next to hf_paged's."""
    if next(model.parameters()).dtype not in (torch.float16, torch.bfloat16) or args.tp > 1:
        return None
    current = model.config._attn_implementation
    other = "eager" if current != "eager" else "sdpa"
    model.set_attn_implementation(other)
    try:
        records, _ = run_batches(model, tokenizer, batches, kwargs, args.seed, device, f"stock {other}", show)
    finally:
        model.set_attn_implementation(current)
    return [current, other], records


def evaluate(args: argparse.Namespace, state: PartialState) -> dict | None:
    """Run the evaluation in this process; returns the summary on the main process, None elsewhere."""
    check_args(args, state)
    encoder_decoder = is_encoder_decoder(args.model)
    apply_task_defaults(args, encoder_decoder)
    metrics = parse_metrics(args.metric)
    check_available(metrics)
    try:
        config = hf_paged.PagedConfig(
            page_size=args.page_size, window_page_size=args.window_page_size, num_pages=args.num_pages, max_memory=parse_memory(args.max_memory),
            backend=args.backend, cascade=False if args.no_cascade else None, compile=args.compile,
            prefix_cache=args.prefix_cache, kv_cache_dtype=args.kv_cache_dtype,
        )
    except ValueError as error:
        raise EvalError(
            f"bad paging flag (--page-size, --window-page-size, --num-pages, --max-memory, --backend, --kv-cache-dtype): {error}"
        ) from error
    data_files = args.data_files or (None if args.dataset else bundled_data_files(args.task))
    with state.main_process_first():
        # The built-in data is a "test" split, as --help says; --data-files give a "train" split.
        rows = load_rows(args.dataset, args.dataset_config, args.split, data_files, "train" if args.data_files else "test")
    samples = make_samples(rows, args.text_column, args.reference_column or None, args.prompt_template, args.limit)
    device = torch.device(args.device) if args.device else state.device
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.threads is None and args.model is None:
        # The built-in model's matmuls are too small to gain from threads; on a busy CPU they lose a lot.
        torch.set_num_threads(1)
    model, tokenizer, model_name = load_model(args.model, args.dtype, device, parse_device_map(args.device_map), tp=args.tp)
    device = input_device(model)
    prompt_ids = encode_prompts(tokenizer, samples, context_length(model), args.max_new_tokens, args.truncate, encoder_decoder)
    batches = make_batches(samples, prompt_ids, args.batch_size)
    kwargs = generate_kwargs(args, tokenizer)
    # Data parallel: each process its share of the batches. Tensor parallel: every rank runs every
    # batch (each computes its heads of one model) and the main process reports.
    my_batches = batches
    if args.tp == 1:
        with state.split_between_processes(batches) as my_batches:
            my_batches = list(my_batches)
    show = state.is_local_main_process
    # --compare in half precision: an fp32 copy of the model (the same weights, widened) sets the path
    # along which both the wrapped and the stock model's logits are compared with fp32's.
    wants_logit_error = args.compare and args.tp == 1 and args.device_map is None and not args.no_logit_error and not encoder_decoder
    reference = fp32_copy(model) if wants_logit_error else None  # None in fp32
    if reference is not None:
        paths = fp32_paths(reference, my_batches, tokenizer.pad_token_id, device, args.max_new_tokens)
        logit_errors = {}

    try:
        hf_paged.wrap(model, config)
    except (hf_paged.UnsupportedModelError, ValueError) as error:  # ValueError: --backend cannot serve it
        raise EvalError(str(error)) from error
    geometry = hf_paged.memory_stats(model)
    executor = model.hf_paged_runtime.executor.name  # what "auto" resolved to
    placement = pool_placement(model)
    try:
        if my_batches and not args.no_warmup:
            warm_up(model, tokenizer, my_batches, kwargs, device)  # every compiled shape, with --compile
        before = hf_paged.memory_stats(model)
        paged_records, paged_stats = run_batches(model, tokenizer, my_batches, kwargs, args.seed, device, "paged", show)
        after = hf_paged.memory_stats(model)
        prefix_counts = prefix_cache_counts(before, after)
        rank_pool = {key: after[key] for key in ("tp_rank", "num_pages", "page_bytes", "pool_bytes")}
        rank_pool["peak_kv_bytes"] = paged_stats.peak_kv_bytes  # over this rank's batches
        if reference is not None:
            logit_errors["paged"] = mean_abs_error(model, reference, my_batches, paths, tokenizer.pad_token_id, device, args.max_new_tokens)
        stock_records, stock_stats = [], RunStats()
        other_attention = None
        if args.compare:
            hf_paged.unwrap(model)
            if device.type == "cuda":  # hand the page pool's memory back before the stock run
                gc.collect()
                torch.cuda.empty_cache()
            if my_batches and not args.no_warmup:
                warm_up(model, tokenizer, my_batches, kwargs, device)
            stock_records, stock_stats = run_batches(model, tokenizer, my_batches, kwargs, args.seed, device, "stock", show)
            other_attention = run_other_attention(args, model, tokenizer, my_batches, kwargs, device, show)
            if reference is not None:
                logit_errors["stock"] = mean_abs_error(model, reference, my_batches, paths, tokenizer.pad_token_id, device, args.max_new_tokens)
    except hf_paged.OutOfPagesError as error:
        failure = f"out of pages: {error} (flags: --num-pages, --max-memory, --batch-size, --max-new-tokens)"
    else:
        failure = None
    # A failure may hit one shard only: every process learns of it before gathering results, so all
    # exit 2 together (the main process prints it) instead of leaving the others in a collective.
    failures = [(index, message) for index, message in enumerate(gather_object([failure])) if message]
    if failures:
        index, message = failures[0]
        raise EvalError(f"[process {index}] {message}" if state.num_processes > 1 else message)

    rank_pools = gather_object([rank_pool])
    if args.tp > 1:  # every rank generated the same outputs: the main process's records and measures stand for all
        paged_records, stock_records, prefix_counts = paged_records, stock_records, [prefix_counts]
        paged_stats, stock_stats = [paged_stats], [stock_stats]
    else:
        paged_records = gather_object(paged_records)
        stock_records = gather_object(stock_records)
        paged_stats, stock_stats = gather_object([paged_stats]), gather_object([stock_stats])
        prefix_counts = gather_object([prefix_counts])
    if other_attention is not None:  # (never under --tp: run_other_attention)
        other_attention = (other_attention[0], sorted(gather_object(other_attention[1]), key=lambda record: record["index"]))
    logit_error = None
    if reference is not None:  # data parallel: the processes' means, weighted by their logits
        logit_error = combine(gather_object([logit_errors]))
    paged_records = sorted(paged_records, key=lambda record: record["index"])
    stock_records = sorted(stock_records, key=lambda record: record["index"])
    if not state.is_main_process:
        return None
    summary = summarize(paged_records, paged_stats, metrics)
    summary.update(
        model=model_name,
        data={"task": args.task, "dataset": args.dataset, "dataset_config": args.dataset_config, "split": args.split, "data_files": data_files},
        num_processes=state.num_processes,
        generation=kwargs,
        paging={key: geometry[key] for key in ("page_size", "num_pages", "page_bytes", "pool_bytes", "kv_cache_dtype")}
        | {"backend": executor, "requested_backend": args.backend, "compile": args.compile}
        | {"groups": [{key: group[key] for key in ("window", "num_layers", "page_size")} for group in geometry["groups"]]},
        pool_placement=placement,
        prefix_cache=prefix_cache_summary(prefix_counts) if args.prefix_cache else None,
        # Under --tp each rank's pool holds its share of the KV heads (KV figures above are rank 0's).
        tensor_parallel={"tp_size": args.tp, "ranks": rank_pools},
    )
    if args.compare:
        summary["stock"] = summarize(stock_records, stock_stats, metrics)
        summary["ratios"] = ratios(summary, summary["stock"])
        summary["agreement"] = agreement(paged_records, stock_records)
        if other_attention is not None:  # half precision: how far stock's own implementations agree
            names, other_records = other_attention
            summary["stock_attention_agreement"] = {"implementations": names, "agreement": agreement(other_records, stock_records)}
        if logit_error is not None:
            summary["logit_error_vs_fp32"] = logit_error
        for record, stock in zip(paged_records, stock_records):
            record.update(stock_output_text=stock["output_text"], stock_output_ids=stock["output_ids"],
                          match=record["output_ids"] == stock["output_ids"])
    print(table(summary))
    if args.output_dir:
        samples_path, summary_path = write_outputs(args.output_dir, paged_records, summary)
        print(f"wrote {samples_path} and {summary_path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, with a one-line message on stderr)."""
    args = build_parser().parse_args(argv)
    # On CPU, processes started by `accelerate launch --multi_gpu` (torchrun) join through gloo only
    # when PartialState is told it runs on CPU.
    on_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or args.device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)
    try:
        evaluate(args, state)
        state.wait_for_everyone()  # no rank tears its group down while another still works
    except EvalError as error:
        if state.is_main_process:
            print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter exits: a gloo group still alive at exit can
    abort a rank ("terminate called without an active exception", SIGABRT) after its work is done.
    Whatever reference cycles still hold (the model, its collectives' work) is collected first, while
    the interpreter is whole: a collection during its exit is where gloo can abort."""
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
