"""eval.py's outputs as docs/evaluation.md documents them, and --compile timings without compilation (issue 15)."""

import torch

import hf_paged.integration.compile

from script_runs import SAMPLE_FIELDS, eval_script, run_eval

RUN = ["--limit", "6", "--batch-size", "4", "--max-new-tokens", "4"]  # batches of 4 and 2 prompts


def test_batch_times_are_recorded_once_per_batch(tmp_path):
    code, records, summary = run_eval(tmp_path, *RUN, "--no-warmup", "--compare")
    assert code == 0
    for record in records:
        assert set(record) == SAMPLE_FIELDS | {"stock_output_text", "stock_output_ids", "match"}
        assert record["generated_tokens"] == sum(len(ids) for ids in record["output_ids"])
    for part in (summary, summary["stock"]):
        batches = part["batches"]
        assert [entry["batch"] for entry in batches] == [0, 1] and part["num_batches"] == 2
        assert [entry["num_samples"] for entry in batches] == [4, 2]
        assert abs(sum(entry["seconds"] for entry in batches) - part["generate_seconds"]) < 1e-9
        assert all(0 < entry["time_to_first_token_s"] <= entry["seconds"] for entry in batches)
    assert {record["batch"] for record in records} == {0, 1}


def test_paging_records_the_executor_that_ran(tmp_path):
    code, _, summary = run_eval(tmp_path, *RUN, "--no-warmup")
    assert code == 0
    assert summary["paging"]["backend"] == "torch" and summary["paging"]["requested_backend"] == "auto"
    assert summary["paging"]["groups"] == [{"window": None, "num_layers": 2, "page_size": 16}]


def test_compile_warm_up_covers_every_shape_of_the_timed_run(tmp_path, monkeypatch):
    """Compilation in the timed run counted compile time as generation time (tokens/s ratio 0.1)."""
    defaults = hf_paged.integration.compile.default_compile_options
    monkeypatch.setattr(hf_paged.integration.compile, "default_compile_options", lambda model: {**defaults(model), "backend": "eager"})
    graphs, run_batches = {}, eval_script.run_batches

    def counting_run_batches(model, *args, **kwargs):
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        steps = model.hf_paged_runtime.compiled.num_compiled_steps
        result = run_batches(model, *args, **kwargs)
        graphs["timed run"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
        graphs["compiled steps"] = model.hf_paged_runtime.compiled.num_compiled_steps - steps
        return result

    monkeypatch.setattr(eval_script, "run_batches", counting_run_batches)
    code, _, summary = run_eval(tmp_path, *RUN, "--compile", "--num-beams", "2")  # Dynamo reset: conftest.py
    assert code == 0
    assert graphs["compiled steps"] > 0 and graphs["timed run"] == 0
    assert summary["paging"]["compile"] is True
