import random

import pytest
from transformers import AutoTokenizer

from launcher.tiny_model import CORPUS, build_tiny_model
from router.detokenizer import IncrementalDetokenizer, _StreamCleanup
from router.tokenization import ModelTokenizer

MULTIBYTE = "Größe, naïve café, déjà vu — señor, 東京は日本の首都です。 Привет, мир! 🙂🚀 שלום"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("detok") / "m", "llama")


@pytest.fixture(scope="module")
def tok(model_dir):
    return ModelTokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def cleanup_tok(model_dir):
    """The same vocabulary with transformers' clean_up_tokenization_spaces on (as e.g. Llama 3 ships).
    transformers 5 applies it to a BPE vocabulary only when forced, which is what a WordPiece one gets."""
    hf = AutoTokenizer.from_pretrained(model_dir, clean_up_tokenization_spaces=True,
                                       clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    return ModelTokenizer(hf, frozenset(), None)


def byte_ids(tok, text: str) -> list[int]:
    """One token per byte (the byte-level alphabet), so every multi-byte character is split."""
    return [i for t in tok.hf.convert_ids_to_tokens(tok.encode(text)) for i in tok.hf.convert_tokens_to_ids(list(t))]


def stream(tok, ids, prompt_ids=None) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids)
    pieces = [detok.push(i) for i in ids]
    return [*pieces, detok.flush()]


def assert_exact(tok, ids, prompt_ids=None):
    full = tok.hf.decode(ids, skip_special_tokens=True)
    pieces = stream(tok, ids, prompt_ids)
    assert "".join(pieces) == full, (ids, pieces)
    # Every piece is final: it sits exactly where the full decode has it (no "\ufffd" that later changes).
    offset = 0
    for piece in pieces:
        assert full[offset : offset + len(piece)] == piece, (ids, pieces)
        offset += len(piece)


@pytest.mark.parametrize("text", [*CORPUS, MULTIBYTE, "🙂" * 5 + "東" * 3])
def test_real_encodings_stream_exactly(tok, text):
    ids = tok.encode(text)
    assert_exact(tok, ids)
    assert "".join(stream(tok, ids)) == text


def test_random_ids_stream_exactly(tok):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 40))]
        assert_exact(tok, ids)


def test_byte_tokens_split_characters(tok):
    singles = byte_ids(tok, MULTIBYTE)
    assert len(singles) == len(MULTIBYTE.encode())
    assert_exact(tok, singles)
    pieces = stream(tok, singles)
    assert "".join(pieces) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)


def test_truncated_character_at_the_end_is_flushed_like_decode(tok):
    cut = byte_ids(tok, "ab🙂")[:-1]  # the emoji misses its last byte
    pieces = stream(tok, cut)
    assert pieces[-1] == "\ufffd" and "".join(pieces) == tok.decode(cut)


def test_special_tokens_are_skipped(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "Привет 🙂"}]) + tok.encode("Hi 東京<|im_end|>")
    assert_exact(tok, ids)
    assert "<|im_end|>" not in "".join(stream(tok, ids))


def test_prompt_context_gives_same_text_for_byte_level(tok):
    rng = random.Random(1)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Größe?"}])
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 30))]
        assert "".join(stream(tok, ids, prompt)) == tok.decode(ids)
    # A prompt given as ids that end mid-character cannot serve as context: it is dropped.
    ids = tok.encode(" ok")
    assert "".join(stream(tok, ids, byte_ids(tok, "🙂")[:2])) == tok.decode(ids)


def test_window_stays_small(tok):
    class CountingTokenizer:
        special_ids = tok.special_ids
        clean_up_tokenization_spaces = False
        widest = 0

        def decode_raw(self, ids, skip_special_tokens=True):
            CountingTokenizer.widest = max(CountingTokenizer.widest, len(ids))
            return tok.decode_raw(ids, skip_special_tokens)

    ids = tok.encode(" ".join(CORPUS) * 20)
    detok = IncrementalDetokenizer(CountingTokenizer())
    text = "".join(detok.push(i) for i in ids)
    assert CountingTokenizer.widest <= 8 < len(ids)
    assert text + detok.flush() == tok.decode(ids)


def test_clean_up_tokenization_spaces_streams_exactly(cleanup_tok):
    text = "I can 't , won 't . Is n't it ? Yes ! They 're , we 've ' em 'm 's ' ' n't  ' ve"
    ids = cleanup_tok.encode(text)
    assert cleanup_tok.decode(ids) != cleanup_tok.decode_raw(ids)  # the clean-up really changes this text
    assert_exact(cleanup_tok, ids)
    rng = random.Random(2)
    chars = [cleanup_tok.encode(c)[0] for c in " n't'vremsx.,?!"] + cleanup_tok.encode(" n't 're 's 've")
    for _ in range(300):
        assert_exact(cleanup_tok, [rng.choice(chars) for _ in range(rng.randint(0, 25))])


def cleaned_in_pieces(clean, pieces: list[str]) -> str:
    cleanup = _StreamCleanup(clean)
    return "".join(cleanup.feed(p) for p in pieces) + cleanup.flush("")


CASCADES = ["x  ' ve", "x  ' re", "a  ' m", "do n ' t", "it 's .", "a ' b", "so ,  ' s", "  ' ' n't"]


@pytest.mark.parametrize("text", CASCADES)
def test_stream_cleanup_every_cut_of_cascading_patterns(cleanup_tok, text):
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            pieces = [text[:i], text[i:j], text[j:]]
            assert cleaned_in_pieces(cleanup_tok.clean_up, pieces) == cleanup_tok.clean_up(text), pieces


def test_stream_cleanup_random_splits(cleanup_tok):
    rng = random.Random(3)
    fragments = [" ", " ", "'", " ' ", "  ' ", "n", "t", "ve", "re", "m", "s", "x", ".", ",", "?", "!"]
    for _ in range(3000):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(0, 10)))
        bounds = [0, *sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text) + 1))), len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        assert cleaned_in_pieces(cleanup_tok.clean_up, pieces) == cleanup_tok.clean_up(text), pieces


@pytest.fixture(scope="module")
def metaspace_tok():
    """A SentencePiece-style tokenizer ("▁" marks spaces; decoding drops the first token's leading one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["</s>", *alphabet], show_progress=False)
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", clean_up_tokenization_spaces=False)
    return ModelTokenizer(hf, frozenset({0}), None)


def test_metaspace_tokenizer_streams_exactly(metaspace_tok):
    rng = random.Random(4)
    for text in [*CORPUS, MULTIBYTE]:
        assert_exact(metaspace_tok, metaspace_tok.encode(text))
    for _ in range(200):
        assert_exact(metaspace_tok, [rng.randrange(metaspace_tok.vocab_size) for _ in range(rng.randint(0, 30))])


def test_metaspace_prompt_context_keeps_leading_space(metaspace_tok):
    prompt = metaspace_tok.encode("The quick brown")
    ids = metaspace_tok.encode("The quick brown fox jumps")[len(prompt) :]
    assert metaspace_tok.decode(ids) == "fox jumps"  # decode alone drops the leading "▁"
    assert "".join(stream(metaspace_tok, ids, prompt)) == " fox jumps"
