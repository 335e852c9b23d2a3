"""The first minutes on a GPU: does the FlashInfer executor give the torch executor's tokens, how
long does its JIT take, and what does a call cost against stock (scripts/gpu_check.sh runs it first).

    python scripts/gpu_smoke.py --json smoke.json              # CUDA: FlashInfer against the torch executor
    python scripts/gpu_smoke.py --device cpu --limit 2          # the same calls on CPU (torch executor only)

On the trained default model in bf16 (head dim 64) with the built-in task's first `--limit`
prompts, left-padded, `--new-tokens` each, greedy and 4 beams, it runs in turn: stock, pages on the
torch executor, pages on FlashInfer (CUDA only), and fp8_e4m3 pages (FlashInfer reads fp8 only at
head dims 128 and 256, so on this model every layer falls back to the torch executor: docs/fp8.md),
then FlashInfer with fp8 pages on a random Llama of head dim 128 against the torch executor with fp8
pages. Each side's first call (FlashInfer's JIT build happens there) and a second, timed call are
reported, with the fraction of rows whose tokens equal the torch executor's. Equal tokens are not
required: FlashInfer's bf16 rounding differs from SDPA's, and a near-tie can go either way
(tests/test_gpu.py judges that by teacher forcing); rows that differ are what to look at first.
"""

import argparse
import json
import platform
import time

import torch

import hf_paged


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def default_model_batch(device: torch.device, limit: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_paged.evaluation import default_model_path
    from hf_paged.evaluation.data import BUNDLED_DATA

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), padding_side="left")
    texts = [json.loads(line)["prompt"] for line in BUNDLED_DATA.read_text().splitlines()[:limit]]
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.bfloat16).to(device).eval()
    return model, batch, tokenizer.pad_token_id


def head_dim_128_llama(device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=128, pad_token_id=0)
    model = LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
    ids = torch.randint(3, 512, (4, 40), generator=torch.Generator().manual_seed(1)).to(device)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0


def run_side(model, batch, pad_id: int, new_tokens: int, num_beams: int, wrap: dict | None) -> dict:
    if hasattr(model, "hf_paged_runtime"):
        hf_paged.unwrap(model)
    if wrap is not None:
        hf_paged.wrap(model, **wrap)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=num_beams,
                  pad_token_id=pad_id)
    first, first_s = timed(lambda: model.generate(**batch, **kwargs))
    second, second_s = timed(lambda: model.generate(**batch, **kwargs))
    side = {"first_call_s": round(first_s, 3), "second_call_s": round(second_s, 3),
            "repeat_equal": bool(torch.equal(first, second)), "tokens": second.cpu()}
    if wrap is not None:
        stats = hf_paged.memory_stats(model)
        executor = getattr(model.hf_paged_runtime, "executor", None)
        side.update(executor=getattr(executor, "name", None), peak_pool_bytes=stats["peak_pool_bytes"],
                    pages_in_use_after=stats["pages_in_use"])
    return side


def rows_equal(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(torch.equal(x, y) for x, y in zip(a, b)) / len(a)


def run_sides(title: str, model, batch, pad_id: int, new_tokens: int, num_beams: int, sides: dict, reference: str) -> dict:
    """Each side (a wrap() setting, None: stock) in turn; one failing does not hide the others. Every
    side that ran gets the fraction of its rows equal to side `reference`'s."""
    results = {}
    for name, wrap in sides.items():
        try:
            results[name] = run_side(model, batch, pad_id, new_tokens, num_beams, wrap)
        except Exception as error:  # noqa: BLE001 - reported in the output
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        print(f"{title}, beams {num_beams}, {name}: { {k: v for k, v in results[name].items() if k != 'tokens'} }", flush=True)
    if hasattr(model, "hf_paged_runtime"):
        hf_paged.unwrap(model)
    expected = results[reference].get("tokens")
    for side in results.values():
        tokens = side.pop("tokens", None)
        if tokens is not None and expected is not None:
            side[f"rows_equal_{reference.replace(' ', '_')}"] = rows_equal(tokens, expected)
    return {"model": title, "num_beams": num_beams, "sides": results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, default=8, help="prompts of the built-in task")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    report = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "runs": []}
    try:
        import flashinfer

        report["flashinfer"] = flashinfer.__version__
    except Exception as error:  # noqa: BLE001 - reported, not raised: the torch executor still runs
        report["flashinfer"] = f"does not import: {type(error).__name__}: {error}"
    model, batch, pad_id = default_model_batch(device, args.limit)
    sides = {"stock": None, "torch pages": dict(backend="torch")}
    if cuda:
        sides["flashinfer pages"] = dict(backend="flashinfer")
    sides["fp8_e4m3 pages (auto backend)"] = dict(kv_cache_dtype="fp8_e4m3")
    for num_beams in (1, 4):
        report["runs"].append(run_sides("default (bf16, head dim 64)", model, batch, pad_id, args.new_tokens, num_beams,
                                        sides, reference="torch pages"))
    if cuda:  # FlashInfer's own fp8 path: head dim 128
        model, batch, pad_id = head_dim_128_llama(device)
        sides = {"torch fp8 pages": dict(backend="torch", kv_cache_dtype="fp8_e4m3"),
                 "flashinfer fp8 pages": dict(backend="flashinfer", kv_cache_dtype="fp8_e4m3")}
        report["runs"].append(run_sides("random Llama (bf16, head dim 128)", model, batch, pad_id, args.new_tokens, 1,
                                        sides, reference="torch fp8 pages"))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    return report


if __name__ == "__main__":
    main()
