"""The cache and the compiled decode steps ask what an executor declares, never its name."""

import warnings

import pytest

import hf_paged
from hf_paged import PagedCache
from hf_paged.attention import TorchExecutor
from hf_paged.attention.flashinfer.executor import FlashInferExecutor
from hf_paged.integration.compile import compile_decode

from tiny import tiny_model


def declaring(name: str, **capabilities) -> TorchExecutor:
    """The torch executor under another `name`, with some capabilities overridden."""
    return type("Declaring", (TorchExecutor,), {"name": name, **capabilities})()


@pytest.mark.parametrize("name", ["torch", "custom"])
@pytest.mark.parametrize("cascade, in_place", [(True, True), (False, False), (True, False)])
def test_cascade_default_and_page_reservation_follow_the_capabilities(name, cascade, in_place):
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)  # PagedConfig(cascade=None)
    model.hf_paged_runtime.executor = declaring(name, cascade_by_default=cascade, reads_in_place=in_place)
    with PagedCache(model, max_tokens_per_row=12) as cache:
        assert cache.cascade is cascade
        assert cache.max_tokens_per_row == (12 if in_place else None)


def test_an_explicit_cascade_setting_wins_over_the_default():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4, cascade=False)
    with PagedCache(model) as cache:
        assert cache.cascade is False


def test_the_built_in_executors_declare_what_they_can_do():
    assert (TorchExecutor.cascade_by_default, TorchExecutor.reads_in_place, TorchExecutor.op_runner) == (
        True, True, "torch"
    )
    assert (FlashInferExecutor.cascade_by_default, FlashInferExecutor.reads_in_place) == (False, False)
    assert FlashInferExecutor.op_runner == "flashinfer"


def test_compiled_steps_use_the_declared_runner_or_fall_back_with_a_warning():
    model = hf_paged.wrap(tiny_model("llama"), num_pages=64, page_size=4)
    model.hf_paged_runtime.executor = declaring("torch", op_runner="not-registered")
    with pytest.warns(UserWarning, match="'not-registered' is not registered"):
        compiled = compile_decode(model, backend="eager")
    assert compiled.backend == "torch"
    model.hf_paged_runtime.executor = declaring("anything", op_runner="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compile_decode(model, backend="eager").backend == "torch"


def test_creating_a_flashinfer_executor_registers_its_runner():
    from hf_paged.attention import ops

    FlashInferExecutor()  # imports no flashinfer: that waits for the first plan
    assert "flashinfer" in ops.RUNNERS
    with pytest.raises(ValueError, match="RUNNERS.register"):
        ops.RUNNERS.get("nope")
