"""Tiny encoder-decoder models of every family tests/test_seq2seq.py claims (built from configs, no
hub), right-padded source batches, and the decoding modes the tests compare with stock."""

import torch
import transformers

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
BART_LIKE = dict(
    d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
    encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128,
)
T5_LIKE = dict(
    d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
    relative_attention_num_buckets=8, relative_attention_max_distance=20, **COMMON,
)

SEQ2SEQ = {
    "bart": lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(**BART_LIKE, **COMMON, bos_token_id=1)),
    "mbart": lambda: transformers.MBartForConditionalGeneration(transformers.MBartConfig(**BART_LIKE, **COMMON, bos_token_id=1)),
    "marian": lambda: transformers.MarianMTModel(transformers.MarianConfig(**BART_LIKE, **COMMON)),
    "pegasus": lambda: transformers.PegasusForConditionalGeneration(transformers.PegasusConfig(**BART_LIKE, **COMMON)),
    "m2m100": lambda: transformers.M2M100ForConditionalGeneration(transformers.M2M100Config(**BART_LIKE, **COMMON, bos_token_id=1)),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_LIKE)),
    "mt5": lambda: transformers.MT5ForConditionalGeneration(transformers.MT5Config(**T5_LIKE)),
}

WHISPER_FRAMES = 40  # encoder positions; input features are twice as long


def whisper():
    config = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=WHISPER_FRAMES,
        max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=[],
    )
    return transformers.WhisperForConditionalGeneration(config)


def make(family: str):
    """A tiny model of `family` in eval mode, seeded, with no forced tokens (they would hide the model's choices)."""
    torch.manual_seed(0)
    model = whisper() if family == "whisper" else SEQ2SEQ[family]()
    model.eval()
    model.generation_config.forced_eos_token_id = None
    model.generation_config.forced_bos_token_id = None
    return model


def sources(lengths=(30, 21, 5), seed: int = 3) -> dict:
    """A right-padded batch (as seq2seq tokenizers pad) of sources of these lengths."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=generator)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask)


def features(batch: int = 2, seed: int = 3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(input_features=torch.randn(batch, 8, 2 * WHISPER_FRAMES, generator=generator))


MODES = {
    "greedy": dict(),
    # BART-cnn's settings, with several return sequences
    "beam": dict(num_beams=4, num_return_sequences=2, length_penalty=0.7, no_repeat_ngram_size=3, min_length=5),
    "sample": dict(do_sample=True, num_return_sequences=3, top_k=20),
}
OUTPUTS = dict(max_new_tokens=10, output_scores=True, return_dict_in_generate=True)


def run(model, inputs: dict, **kwargs):
    torch.manual_seed(1)  # sampling draws the same numbers wrapped and unwrapped
    with torch.no_grad():
        return model.generate(**inputs, **OUTPUTS, **kwargs)


# Scores: bit for bit on one thread; on several, a matmul's blocking follows its batch shape (an
# input's beams read one cross-attention copy together, stock reads one per beam), and longer inputs
# (Whisper's frames, a 120-token source) came out up to 1 ulp apart (4.8e-7) on 2 threads.
SCORE_TOLERANCE = dict(rtol=3 * torch.finfo(torch.float32).eps, atol=1e-6)


def assert_same(got, expected) -> None:
    """Element by element: tokens and beam_indices equal; scores and sequences_scores to SCORE_TOLERANCE."""
    assert torch.equal(got.sequences, expected.sequences), (got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores)
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, **SCORE_TOLERANCE)
    if getattr(expected, "sequences_scores", None) is not None:
        torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, **SCORE_TOLERANCE)
    if getattr(expected, "beam_indices", None) is not None:
        assert torch.equal(got.beam_indices, expected.beam_indices)
