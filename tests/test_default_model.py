"""The trained default model that ships in the package (issue 31): what it is, that it loads offline with
the Auto classes, that it learned the held-out code (perplexity far below a random model's), that
the built-in task comes from the held-out modules only, and that a wheel installs both."""

import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from hf_paged.evaluation import default_model_path
from hf_paged.evaluation.corpus import HELD_OUT_MODULES, module_files, training_files
from hf_paged.evaluation.data import BUNDLED_DATA
from hf_paged.evaluation.perplexity import perplexity, read_files

from script_runs import load_script

ROOT = Path(__file__).resolve().parent.parent
FOLDER = default_model_path()
SHIPPED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
           "training.json")


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(FOLDER)


def test_it_is_a_small_gqa_llama_in_half_precision_within_20_mb(model):
    assert {path.name for path in FOLDER.iterdir()} >= set(SHIPPED)
    assert sum(path.stat().st_size for path in FOLDER.iterdir()) <= 20 * 2**20
    with safe_open(FOLDER / "model.safetensors", framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    config = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert 4 <= config.num_hidden_layers <= 6 and 256 <= config.hidden_size <= 384
    assert config.num_key_value_heads < config.num_attention_heads  # GQA: the paged GQA path is what it runs
    assert config.num_key_value_heads % 2 == 0  # `--tp 2` shards it
    assert config.head_dim == 64  # FlashInfer's kernels serve it on a GPU
    assert config.max_position_embeddings >= 512


def test_the_tokenizer_is_byte_level_bpe_with_bos_eos_and_pad(tokenizer):
    assert 4000 <= len(tokenizer) <= 8192
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3
    text = "def f(x):\n    return x ** 2  # é\n"
    encoded = tokenizer(text)["input_ids"]
    assert encoded[0] == tokenizer.bos_token_id and len(encoded) < len(text.encode())  # merges learned
    assert tokenizer.decode(encoded, skip_special_tokens=True) == text  # bytes round-trip


def test_training_record_names_the_held_out_modules_and_the_settings():
    record = json.loads((FOLDER / "training.json").read_text())
    assert record["held_out_modules"] == list(HELD_OUT_MODULES)
    assert record["settings"]["context"] >= 512 and record["settings"]["seed"] == 0
    assert record["held_out_perplexity_fp32"]["perplexity"] < record["settings"]["vocab_size"] / 10
    held_out = {path for name in HELD_OUT_MODULES for path in module_files(name)}
    assert held_out and not held_out & set(training_files())


def test_held_out_perplexity_is_far_below_a_random_model(model, tokenizer):
    """Held-out code the model never saw: trained perplexity at least 10 times below the vocabulary
    size (a uniform guess); the same config with random weights is near that size on the same text."""
    texts = read_files(module_files("textwrap"))
    trained = perplexity(model, tokenizer, texts, context=512)
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config).eval()
    random = perplexity(random_model, tokenizer, texts, context=512)
    assert trained["num_tokens"] == random["num_tokens"] > 3000
    assert trained["perplexity"] < len(tokenizer) / 10
    assert random["perplexity"] > len(tokenizer) / 4


def test_the_built_in_task_completes_held_out_functions():
    rows = [json.loads(line) for line in BUNDLED_DATA.read_text().splitlines()]
    assert len(rows) == 40 and BUNDLED_DATA.stat().st_size < 100_000
    for row in rows:
        module = row["id"].split(":")[0]
        assert module in HELD_OUT_MODULES
        source = "".join(path.read_text() for path in module_files(module))
        # The prompt is a signature and docstring, the reference the lines that follow, as written.
        assert row["prompt"].lstrip().startswith(("def ", "async def ")) and row["prompt"] in source
        assert row["reference"] and all(line in source for line in row["reference"].splitlines())


@pytest.mark.skipif(platform.python_version() != "3.11.7", reason="the shipped data was made from CPython 3.11.7's stdlib")
def test_make_default_data_regenerates_the_shipped_file(tmp_path):
    script = load_script(ROOT / "scripts" / "make_default_data.py", "hf_paged_make_default_data")
    assert script.main(["--output", str(tmp_path / "data.jsonl")]) == 0
    assert (tmp_path / "data.jsonl").read_text() == BUNDLED_DATA.read_text()


def _source_copy(folder: Path) -> Path:
    """The files a build reads, copied (so the build leaves nothing in the checkout)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("hf_paged", "patches"):
        shutil.copytree(ROOT / name, folder / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, folder / name)
    return folder


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_wheel_installs_the_default_model_and_the_built_in_task(tmp_path):
    source = _source_copy(tmp_path / "source")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hf_paged-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"hf_paged/data/default_model/{name}" for name in SHIPPED} <= names
    assert "hf_paged/data/stdlib_functions.jsonl" in names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "import hf_paged\n"
        "from hf_paged.evaluation import default_model_path\n"
        "from hf_paged.evaluation.data import BUNDLED_DATA\n"
        "path = default_model_path()\n"
        f"assert str(path).startswith({str(tmp_path / 'site')!r}) and BUNDLED_DATA.exists(), path\n"
        "tokenizer = AutoTokenizer.from_pretrained(path)\n"
        "model = hf_paged.wrap(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))\n"
        "ids = tokenizer(['def add(a, b):\\n'], return_tensors='pt').input_ids\n"
        "print(model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape[1] - ids.shape[1])\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**env, "PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"},
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.strip() == "4"


@pytest.mark.slow  # ~10 s alone, 30 s on a loaded machine
def test_the_perplexity_script_reports_held_out_and_installed_package_code(tmp_path):
    """docs/default_model.md's command, on one held-out module and one module of an installed package
    (the full run takes minutes): both far below a random model's perplexity, which it reports too."""
    script = load_script(ROOT / "scripts" / "perplexity.py", "hf_paged_perplexity_script")
    out = tmp_path / "ppl.json"
    assert script.main(["--modules", "colorsys", "--packages", "packaging.version", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    vocab = json.loads((FOLDER / "config.json").read_text())["vocab_size"]
    assert set(results) == {"held-out stdlib modules", "package packaging.version",
                            "random weights (first 3 held-out files)"}
    assert results["held-out stdlib modules"]["num_files"] == 1 and results["package packaging.version"]["num_files"] == 1
    for title in ("held-out stdlib modules", "package packaging.version"):
        assert results[title]["num_tokens"] > 1000 and results[title]["perplexity"] < vocab / 10
    assert results["random weights (first 3 held-out files)"]["perplexity"] > vocab / 4
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        script.main(["--modules", "os"])  # trained on: not held out


@pytest.mark.slow  # ~15 s alone
@pytest.mark.subprocess
def test_the_training_script_dry_run_writes_a_model_of_the_shipped_shape(tmp_path):
    """scripts/train_default_model.py --dry-run (3 steps on 40 files): the command docs/default_model.md
    gives still runs end to end and writes what ships, a model of the shipped config that wrap() serves."""
    import copy

    import hf_paged
    from script_runs import CHECKOUT

    out = tmp_path / "model"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_default_model.py"), "--dry-run", "--output-dir", str(out)],
                         capture_output=True, text=True, env={**os.environ, **CHECKOUT, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(SHIPPED)
    written, shipped = (json.loads((folder / "config.json").read_text()) for folder in (out, FOLDER))
    assert {**written, "transformers_version": None} == {**shipped, "transformers_version": None}  # saved by another release
    training = json.loads((out / "training.json").read_text())
    assert training["settings"]["dry_run"] is True and training["settings"]["steps"] == 3
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["def add(a, b):\n"], return_tensors="pt")
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, num_beams=2, pad_token_id=tokenizer.pad_token_id)
    expected = stock.generate(**batch, **kwargs)
    assert torch.equal(hf_paged.wrap(copy.deepcopy(stock)).generate(**batch, **kwargs), expected)
