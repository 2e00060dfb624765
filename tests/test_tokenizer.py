"""tokenizer.json through `tokenizers`, and the fast / expert chat template."""

import pytest

from deepmoe.io.tokenizer import ASSISTANT, BOS, EOS, THINK_CLOSE, THINK_OPEN, USER, chat_prompt, load_tokenizer


def test_chat_modes():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert chat_prompt(messages, "fast") == f"{BOS}Be brief.{USER}2+2?{ASSISTANT}{THINK_CLOSE}"
    assert chat_prompt(messages, "expert") == f"{BOS}Be brief.{USER}2+2?{ASSISTANT}{THINK_OPEN}"
    history = messages + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    assert chat_prompt(history).count(EOS) == 1
    with pytest.raises(ValueError, match="unknown chat mode"):
        chat_prompt(messages, "slow")


def test_tokenizer_json_round_trip(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", BOS, EOS, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE]
    tok.train_from_iterator(["def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    ids = loaded.encode_chat([{"role": "user", "content": "def fib"}], mode="expert")
    assert ids[0] == loaded.token_id(BOS) and ids[-1] == loaded.token_id(THINK_OPEN)
    assert loaded.decode(loaded.encode("def fib(n):")) == "def fib(n):"
    assert load_tokenizer(tmp_path / "nowhere") is None
