"""docs/support.md is what scripts/support_matrix.py produces, and README's list comes from it."""

import importlib.util
from pathlib import Path

import pytest
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("support_matrix", ROOT / "scripts" / "support_matrix.py")
matrix = importlib.util.module_from_spec(spec)
spec.loader.exec_module(matrix)

TEXT = (ROOT / "docs" / "support.md").read_text()
ROWS = matrix.parse_table(TEXT)
seq2seq = matrix.seq2seq
SEQ2SEQ_ROWS = seq2seq.parse_table(matrix.shared(), TEXT)
SAME_RELEASE = matrix.generated_with(TEXT) == transformers.__version__
# Families of every kind of row (through the interface, patched: ALiBi, local layers; refused) and the
# verdict each gets on every release CI runs, written down by hand (not read off the committed table).
SAMPLE = {
    "llama": "pass", "gpt2": "pass", "bloom": "pass", "gpt_neo": "pass", "mpt": "pass", "falcon": "pass",
    "gpt_oss": "refused", "mamba": "refused",
    "deepseek_v3": None,  # its tiny config is not built on 5.25 (any verdict but error or MISMATCH)
}


def test_the_table_has_no_mismatch_and_its_counts_add_up():
    assert ROWS and not [t for t, (result, _) in ROWS.items() if result == "MISMATCH"]
    counts = ", ".join(f"{sum(r == result for r, _ in ROWS.values())} {result}" for result in matrix.RESULTS)
    assert f"**{len(ROWS)} model types: {counts}.**" in TEXT
    assert all(reason for _, reason in ROWS.values())
    assert {t: ROWS[t][0] for t, verdict in SAMPLE.items() if verdict} == {t: v for t, v in SAMPLE.items() if v}


def test_readme_list_is_rendered_from_the_table():
    readme = (ROOT / "README.md").read_text()
    start = readme.index(matrix.README_BEGIN)
    end = readme.index(matrix.README_END) + len(matrix.README_END)
    assert readme[start:end] == matrix.readme_block(TEXT)
    assert "docs/support.md" in readme[:start]


def test_the_table_lists_every_causal_lm_type_of_its_release():
    if SAME_RELEASE:
        assert sorted(ROWS) == sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    else:  # another release (CI's second run) adds or drops a few types; most are the same
        assert len(set(ROWS) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)) > 0.8 * len(ROWS)


@pytest.mark.slow
def test_regenerating_a_sample_gives_the_committed_rows_and_never_a_mismatch():
    for model_type, verdict in SAMPLE.items():
        row = matrix.check_with_timeout(model_type, 300)
        assert row[0] not in ("MISMATCH", "error"), (model_type, row)
        assert verdict is None or row[0] == verdict, (model_type, row)
        if SAME_RELEASE:  # the committed table was generated with this release: the same verdicts
            assert row == ROWS[model_type], model_type


# The encoder-decoder table: issue 29's families (through the interface), a decoder-only audio LM the
# seq2seq mapping lists (left-padded prompts), a refusal and a config the shrinking cannot make tiny.
SEQ2SEQ_SAMPLE = {
    ("bart", "text"): "pass", ("marian", "text"): "pass", ("t5", "text"): "pass", ("m2m_100", "text"): "pass",
    ("whisper", "speech"): "pass", ("qwen2_audio", "text"): "pass",
    # its encoder's attention adds the mask to its scores by hand: the encoder runs on stock's masks
    ("bigbird_pegasus", "text"): "pass",
    ("granite_speech", "speech"): "refused", ("vibevoice", "speech"): "not built",
}


def test_the_encoder_decoder_table_has_no_mismatch_and_its_counts_add_up():
    assert SEQ2SEQ_ROWS and not [key for key, (result, _) in SEQ2SEQ_ROWS.items() if result == "MISMATCH"]
    counts = ", ".join(f"{sum(r == result for r, _ in SEQ2SEQ_ROWS.values())} {result}" for result in matrix.RESULTS)
    assert f"**{len(SEQ2SEQ_ROWS)} rows: {counts}.**" in TEXT
    assert all(reason for _, reason in SEQ2SEQ_ROWS.values())
    assert {key: SEQ2SEQ_ROWS[key][0] for key in SEQ2SEQ_SAMPLE} == SEQ2SEQ_SAMPLE
    if SAME_RELEASE:  # every type of both mappings, once per mapping that lists it
        assert sorted(SEQ2SEQ_ROWS) == sorted((t, m) for m in seq2seq.MAPPINGS for t in seq2seq.rows_of(m))
    assert TEXT.index(seq2seq.HEADING) > TEXT.index("| model type | result | reason |")  # the second table


def test_the_encoder_decoder_table_has_no_error():
    assert [key for key, (result, _) in SEQ2SEQ_ROWS.items() if result == "error"] == []


@pytest.mark.slow
def test_regenerating_an_encoder_decoder_sample_gives_the_committed_rows():
    for (model_type, mapping), verdict in SEQ2SEQ_SAMPLE.items():
        row = seq2seq.check_with_timeout(matrix.shared(), mapping, model_type, 300)
        assert row[0] == verdict, (model_type, mapping, row)
        if SAME_RELEASE:
            assert row == SEQ2SEQ_ROWS[(model_type, mapping)], (model_type, mapping)


def test_types_of_the_encoder_decoder_table_are_printed_not_written(capsys):
    before = (ROOT / "docs" / "support.md").read_text()
    assert matrix.main(["--tables", "seq2seq", "--types", "marian"]) == 0
    assert capsys.readouterr().out.startswith(f"marian (text): {SEQ2SEQ_ROWS[('marian', 'text')][0]}: ")
    assert (ROOT / "docs" / "support.md").read_text() == before
    assert matrix.main(["--tables", "seq2seq", "--types", "llama"]) == 2  # a causal type: not in this table
    assert "not model types of the seq2seq table" in capsys.readouterr().err
