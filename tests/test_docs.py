"""README.md, CHANGELOG.md and docs/: the README stays a front door, every link and module path they
name exists, every scripts/eval.py and scripts/bench.py command they show parses, their Python
snippets run, and what they say about `window_page_size` is the rule the pool applies."""

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import hf_paged
from hf_paged.config import WINDOW_PAGE_SIZE_RULE
from hf_paged.memory.groups import GroupSpec, window_page_size
from hf_paged.memory.layout import LayerSpec
from hf_paged.memory.pool import pool_layout

from script_runs import ROOT, eval_script, load_script

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, ROOT / "CHANGELOG.md", *DOCS]
MAX_README_LINES = 250


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def code_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, the heading above it, code) of each fenced block."""
    blocks, heading, language, code = [], "", None, []
    for line in text.splitlines():
        if language is None and line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            if language is None:
                language, code = line[3:].strip(), []
            else:
                blocks.append((language, heading, "\n".join(code)))
                language = None
        elif language is not None:
            code.append(line)
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in without_code_blocks(path.read_text()).splitlines():
        if line.startswith("#"):
            base = slug(line.lstrip("#"))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


# ---------------------------------------------------------------------------------------- the front door


def test_readme_is_a_front_door_of_at_most_250_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move details to docs/"


def test_readme_links_every_docs_page():
    readme = README.read_text()
    missing = [rel(page) for page in DOCS if f"]({rel(page)})" not in readme]
    assert not missing, f"README.md's Documentation list does not link {missing}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code_blocks(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor in {rel(file)}")
    assert not broken, f"{rel(page)}: {broken}"


def test_no_history_in_the_readme_or_the_docs():
    """History lives in CHANGELOG.md: no sentence about how the code used to be."""
    phrases = ("previous session", "before (main at", "at the start of this work", "before issue",
               "the earlier run", "earlier runs", "the code before")
    found = [(rel(page), phrase) for page in [README, *DOCS] for phrase in phrases
             if phrase in page.read_text().lower()]
    assert not found


# ---------------------------------------------------------------------------------------- module paths

REPO_FILES = [p for p in ROOT.rglob("*") if p.is_file() and not {".git", ".venv"} & set(p.relative_to(ROOT).parts)]


def resolves_as_import(dotted: str) -> bool:
    """`hf_paged.x.y`: a module, or a module's attribute (a class, a function, a constant)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for name in parts[cut:]:
                target = getattr(target, name)
        except AttributeError:
            return False
        return True
    return False


def named_paths(text: str) -> tuple[set[str], set[str], set[str]]:
    """Dotted `hf_paged.*` names, paths from the repository root, and other `*.py` file names."""
    dotted = set(re.findall(r"(?<![\w.])hf_paged(?:\.[A-Za-z_]\w*)+", text))
    rooted = set(re.findall(r"(?<![\w/.-])((?:hf_paged|tests|scripts|patches|docs|\.ci|\.github)/[\w./-]*[\w/])", text))
    files = set(re.findall(r"(?<![\w/.-])((?:[A-Za-z_]\w*/)*[A-Za-z_]\w*\.py)\b", text))
    return dotted, rooted, {f for f in files if not f.startswith(("hf_paged/", "tests/", "scripts/", "patches/"))}


@pytest.mark.parametrize("page", [README, *DOCS], ids=rel)
def test_every_module_path_named_exists(page):
    dotted, rooted, files = named_paths(page.read_text())
    missing = [name for name in sorted(dotted) if not resolves_as_import(name)]
    missing += [path for path in sorted(rooted) if not (ROOT / path).exists()]
    # A bare `layout.py` or `attention/torch/dense.py`: some file of the repository ends so.
    missing += [name for name in sorted(files) if not any(str(p).endswith("/" + name) for p in REPO_FILES)]
    assert not missing, f"{rel(page)} names modules or files that do not exist: {missing}"


def test_the_path_check_catches_a_missing_module():
    dotted, rooted, files = named_paths("see `hf_paged/xxx.py`, `hf_paged.xxx.yyy`, `hf_paged.wrap` and `nothing_here.py`")
    assert rooted == {"hf_paged/xxx.py"} and not (ROOT / "hf_paged/xxx.py").exists()
    assert [name for name in sorted(dotted) if not resolves_as_import(name)] == ["hf_paged.xxx.yyy"]
    assert files == {"nothing_here.py"} and not any(str(p).endswith("/nothing_here.py") for p in REPO_FILES)


def test_changelog_moves_are_real_and_leave_no_shims():
    """Each row of CHANGELOG.md's move table: the new path imports, no module file stays at the old one."""
    text = (ROOT / "CHANGELOG.md").read_text()
    rows = re.findall(r"^\| `(hf_paged[\w.]*)`[^|]*\| `(hf_paged[\w.]*)` \|$", text, flags=re.M)
    assert len(rows) >= 20
    for old, new in rows:
        importlib.import_module(new)
        assert not (ROOT / (old.replace(".", "/") + ".py")).exists(), f"a shim module stays at {old}"
    assert all(resolves_as_import(f"hf_paged.{name}") for name in
               ("wrap", "unwrap", "PagedConfig", "PagedCache", "memory_stats", "clear_prefix_cache", "errors"))


# ---------------------------------------------------------------------------------------- script commands


def script_commands(text: str) -> list[list[str]]:
    """The arguments of each scripts/eval.py or scripts/bench.py command, in code blocks and inline code."""
    lines = []
    for language, _, code in code_blocks(text):
        if language in ("bash", "sh", ""):
            lines += code.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`([^`]+)`", without_code_blocks(text).replace("\n", " "))
    commands = []
    for line in lines:
        if "scripts/eval.py" not in line and "scripts/bench.py" not in line:
            continue
        words = shlex.split(line, comments=True)
        for index, word in enumerate(words):
            if word.endswith(("scripts/eval.py", "scripts/bench.py")):
                rest = []
                for arg in words[index + 1:]:
                    if arg in ("&&", "||", ";", "|"):
                        break
                    rest.append(arg)
                commands.append([word.rsplit("/", 1)[-1], *[arg for arg in rest if arg != "..."]])
    return commands


bench_script = load_script(ROOT / "scripts" / "bench.py", "hf_paged_bench_script_for_docs")
bench_workloads = load_script(ROOT / "scripts" / "_bench_workloads.py", "hf_paged_bench_workloads_for_docs")


def parses(command: list[str]) -> None:
    """Parse a command's arguments with its script's own parser (argparse exits on a bad flag)."""
    script, args = command[0], command[1:]
    if script == "eval.py":
        eval_script.build_parser().parse_args(args)
    else:
        parsed = bench_script.parse_args(args)
        names = [n.strip() for n in parsed.workload.split(",") if n.strip() != "overhead"]
        bench_workloads.select_workloads(",".join(names) or "none", {}, parsed.quick)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_script_command_parses(page):
    bad = []
    for command in script_commands(page.read_text()):
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                parses(command)
        except SystemExit:
            bad.append(f"{' '.join(command)}: {err.getvalue().strip().splitlines()[-1:]}")
    assert not bad, f"{rel(page)}: {bad}"


def test_the_command_check_finds_commands_and_catches_a_bad_flag():
    text = "```bash\npython scripts/eval.py --compare \\\n    --num-beams 4  # a comment\n```\nand `python scripts/bench.py --no-such-flag`"
    commands = script_commands(text)
    assert commands == [["eval.py", "--compare", "--num-beams", "4"], ["bench.py", "--no-such-flag"]]
    parses(commands[0])
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parses(commands[1])
    with pytest.raises(SystemExit):
        parses(["bench.py", "--workload", "bogus"])


def test_the_readme_shows_the_commands_the_suite_runs():
    """The first command (install + the main job) and the test command, as written."""
    (first, *_), (_, _, block) = script_commands(README.read_text()), code_blocks(README.read_text())[1]
    assert first == ["eval.py"]
    assert 'pip install torch==2.13.0 && pip install -e ".[eval,test]" && python scripts/eval.py' in block
    assert "\npython -m pytest" in block


# ---------------------------------------------------------------------------------------- snippets


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Three special tokens and one token per byte; left padding (what the snippets load from a folder)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny Llama and its tokenizer saved as a folder: what "path/or/name" stands for."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def seq2seq_folder(tmp_path_factory) -> Path:
    """A tiny Marian and the byte tokenizer (right padding, as seq2seq tokenizers pad) saved as a
    folder: what "Helsinki-NLP/opus-mt-en-de" stands for."""
    folder = tmp_path_factory.mktemp("marian")
    torch.manual_seed(0)
    config = transformers.MarianConfig(
        vocab_size=259, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )
    transformers.MarianMTModel(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


# Python blocks of the README and docs, by (page, heading): run in order in one namespace per page,
# or not run, with the reason. A new block must be added to one of the two.
RUN = {
    "README.md": ["A causal LM", "Beams and samples", "The prefix cache", "Encoder-decoder models"],
    "docs/seq2seq.md": ["Usage"],
    "docs/usage.md": ["Your own decode loop"],
    "docs/prefix-caching.md": ["Prefix caching"],
    "docs/default_model.md": ["The default model"],
    "docs/fp8.md": ["fp8 KV pages"],
}
NOT_RUN = {
    ("README.md", "hf_paged"): "an outline with `...` arguments; the Usage blocks below it run",
    ("docs/multi-gpu.md", "Tensor parallel"): "needs torchrun: tests/test_tensor_parallel.py runs TP on two gloo processes",
}


def python_blocks(page: Path) -> list[tuple[str, str]]:
    return [(heading, code) for language, heading, code in code_blocks(page.read_text()) if language == "python"]


def test_every_python_block_is_run_or_says_why_not():
    found = {(rel(page), heading) for page in [README, *DOCS] for heading, _ in python_blocks(page)}
    listed = {(page, heading) for page, headings in RUN.items() for heading in headings} | set(NOT_RUN)
    assert found == listed, (
        f"python blocks not accounted for: {sorted(found - listed)} (add each to RUN or NOT_RUN in "
        f"tests/test_docs.py); listed but gone: {sorted(listed - found)}"
    )


@pytest.mark.parametrize("page", [pytest.param(page, marks=pytest.mark.slow) if page == "README.md" else page
                                  for page in sorted(RUN)])  # README's: 8 beams x 128 tokens in bf16, ~40 s
def test_python_blocks_run_as_written(page, model_folder, seq2seq_folder):
    """Each block as the page writes it, on a tiny model folder for "path/or/name" and the CPU for "cuda"."""
    blocks = dict(python_blocks(ROOT / page))
    namespace: dict = {}
    if page != "README.md":  # blocks that continue the README's: a wrapped model and a batch
        tok = transformers.AutoTokenizer.from_pretrained(model_folder, padding_side="left")
        model = hf_paged.wrap(AutoModelForCausalLM.from_pretrained(model_folder), num_pages=256)
        batch = tok(["Summarize: a b", "Translate: c"], return_tensors="pt", padding=True)
        namespace.update(torch=torch, hf_paged=hf_paged, model=model, tok=tok, batch=batch,
                         input_ids=batch["input_ids"], mask=batch["attention_mask"])
    for heading in RUN[page]:
        code = blocks[heading].replace('"path/or/name"', repr(str(model_folder))).replace('device_map="cuda"', 'device_map="cpu"')
        code = code.replace('"Helsinki-NLP/opus-mt-en-de"', repr(str(seq2seq_folder)))
        if "batches" in code:  # a few-shot run: one long prefix before every question
            prefix = "Answer in one word. " * 4
            namespace["batches"] = [namespace["tok"]([prefix + q for q in questions], return_tensors="pt", padding=True)
                                    for questions in (["Red?", "Blue?"], ["Green or grey?", "Black?"])]
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(code, f"{page}: {heading}", "exec"), namespace)
        if "prefix_cache=True" in code:  # the second batch found the first's pages
            assert hf_paged.memory_stats(namespace["model"])["prefix_hit_tokens"] > 0, heading
        if "print(" in code:
            assert printed.getvalue().strip(), heading


# ---------------------------------------------------------------------------------------- window_page_size


def normalized(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def gemma3_like(num_sliding: int, window: int = 128) -> torch.nn.Module:
    """One full-attention layer and `num_sliding` sliding ones, one KV head of 32 each."""
    config = transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=1 + num_sliding, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=window, vocab_size=128, pad_token_id=0,
        layer_types=["full_attention"] + ["sliding_attention"] * num_sliding,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def mistral_like(window: int) -> torch.nn.Module:
    """Sliding layers only."""
    config = transformers.MistralConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, sliding_window=window, vocab_size=128, pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def sliding_page_sizes(model: torch.nn.Module, **settings) -> list[int]:
    wrapped = hf_paged.wrap(model, num_pages=8, page_size=16, **settings)
    return [group.page_size for group in wrapped.hf_paged_runtime.groups if group.window is not None]


# Each example the rule's text gives, as the text words it, and the model it speaks of.
EXAMPLES = [
    ("one sliding layer per full layer gets pages of 16", lambda: gemma3_like(1), {}, [16]),
    ("two get 8", lambda: gemma3_like(2), {}, [8]),
    ("three get 5", lambda: gemma3_like(3), {}, [5]),
    ("five get 3", lambda: gemma3_like(5), {}, [3]),
    ("three per full layer: 4", lambda: gemma3_like(3), dict(prefix_cache=True), [4]),
    ("five: still 3", lambda: gemma3_like(5), dict(prefix_cache=True), [3]),
    ("window 128 gets 4", lambda: mistral_like(128), {}, [4]),
    ("256 gets 8", lambda: mistral_like(256), {}, [8]),
    ("512 and more page_size", lambda: mistral_like(512), {}, [16]),
    ("512 and more page_size", lambda: mistral_like(4096), {}, [16]),
    ("A value given is every sliding group's page size", lambda: gemma3_like(5), dict(window_page_size=2), [2]),
    ("A value given is every sliding group's page size", lambda: gemma3_like(5), dict(window_page_size=8), [8]),
]


@pytest.mark.parametrize("phrase, build, settings, expected", EXAMPLES, ids=[f"{e[0]}-{e[2]}" for e in EXAMPLES])
def test_window_page_size_examples_are_what_the_pool_chooses(phrase, build, settings, expected):
    assert phrase in WINDOW_PAGE_SIZE_RULE
    assert sliding_page_sizes(build(), **settings) == expected


def test_window_page_size_without_room_and_with_two_windows_follows_the_rule():
    """A group that does not fit even at pages of 1 takes the largest divisor <= window // 32; with no
    full layers, the other windows' groups fit into the largest group's pages."""
    cpu = torch.device("cpu")

    def sizes(windows, heads, **settings):
        specs = [LayerSpec(h, 32, cpu, torch.float32) for h in heads]
        groups = [GroupSpec(w, tuple(i for i, x in enumerate(windows) if x == w),
                            16 if w is None else window_page_size(w, 16))
                  for w in sorted(set(windows), key=lambda w: (w is not None, w or 0))]
        layout = pool_layout(hf_paged.PagedConfig(page_size=16, **settings), specs, groups)
        return [(g.window, g.page_size) for g in layout.groups]

    assert "does not fit even at pages of 1" in WINDOW_PAGE_SIZE_RULE
    assert sizes([None, 128], heads=[1, 32]) == [(None, 16), (128, 4)]  # 32 heads x 1 token > 16 x 1 head
    assert sizes([None, 256], heads=[1, 32]) == [(None, 16), (256, 8)]
    assert "other windows' groups then fit into that group's pages" in WINDOW_PAGE_SIZE_RULE
    assert sizes([256, 256, 64, 64], heads=[1, 1, 1, 1]) == [(64, 8), (256, 8)]  # 64 alone would get 2


def window_page_size_texts() -> dict[str, str]:
    help_text = next(action.help for action in eval_script.build_parser()._actions
                     if "--window-page-size" in action.option_strings)
    return {
        "PagedConfig docstring": hf_paged.PagedConfig.__doc__,
        "eval.py --help": help_text,
        "README.md": README.read_text(),
        "docs/how-it-works.md": (ROOT / "docs" / "how-it-works.md").read_text(),
    }


@pytest.mark.parametrize("place", sorted(window_page_size_texts()))
def test_every_text_states_the_window_page_size_rule(place):
    assert normalized(WINDOW_PAGE_SIZE_RULE) in normalized(window_page_size_texts()[place]), place


def test_no_text_states_the_old_window_page_size_rule():
    """What the README, eval.py --help and the docstrings said before the rule was written down."""
    stale = ("about window / 32", "a window of 128 gets pages of 4", "with the prefix cache on, a divisor of page_size: 2",
             "largest divisor of page_size that is at most window / 32 (a window")
    texts = {**window_page_size_texts(), **{rel(p): p.read_text() for p in DOCS},
             "memory/groups.py": (ROOT / "hf_paged" / "memory" / "groups.py").read_text()}
    found = [(place, phrase) for place, text in texts.items() for phrase in stale if phrase in normalized(text)]
    assert not found
