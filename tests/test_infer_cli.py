"""`deepmoe generate` (deepmoe.infer.cli.main) on a micro checkpoint, and the chat template / tokenizer choice."""

import json

import jax
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.config import CSA
from deepmoe.infer import generate
from deepmoe.infer.chat import ByteCodec, HFTokenizerCodec, codec_for
from deepmoe.infer.cli import main
from deepmoe.io.tokenizer import ASSISTANT, BOS, USER, chat_prompt
from test_infer_decode import random_params

# One CSA layer + MTP, byte vocabulary: compiles in seconds.
MICRO = dm.ModelConfig(
    vocab_size=260, hidden_size=32, num_layers=1, num_heads=2, head_dim=16, rope_head_dim=8, query_latent_dim=16,
    output_groups=1, output_group_latent_dim=8, layer_types=(CSA,), sliding_window=8, csa_compress_ratio=4,
    hca_compress_ratio=8, indexer_heads=2, indexer_head_dim=8, indexer_topk=2, num_experts=4, experts_per_token=2,
    expert_hidden_dim=16, num_hash_layers=0, residual_streams=2, sinkhorn_iterations=2, num_mtp_layers=1,
    compute_dtype="float32")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    params = random_params(MICRO, 0)
    directory = tmp_path_factory.mktemp("micro")
    dm.save_pretrained(directory, params, MICRO)
    return directory


def _stats(stderr: str) -> dict:
    return json.loads(next(line for line in stderr.splitlines() if line.startswith("{")))


def test_generate_command_streams_and_reports(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--prompt", "héllo", "--max-new-tokens", "6", "--dtype", "float32"]
    assert main([*args, "--mode", "fast", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert "note: no tokenizer.json" in err
    stats = _stats(err)
    assert stats["prompt_tokens"] == 1 + len("héllo".encode()) and 1 <= stats["generated_tokens"] <= 6
    assert "bytes per token" in err  # the cache accounting table
    # the streamed text is the byte decoding of what generate returns for the same prompt
    cfg, params = dm.load_pretrained(checkpoint, "float32")
    codec = ByteCodec(cfg)
    result = generate(params, cfg.replace(compute_dtype="float32"), codec.encode_prompt("héllo", None)[None], 6,
                      key=jax.random.key(0), callback=lambda t, e: None)
    expected = codec.tokenizer.decode(result.tokens[0, :result.lengths[0]])
    assert out == expected + "\n"


def test_generate_command_kernels_flag(checkpoint, capsys):
    """--kernels pallas (interpreted on CPU) prefills through pallas_kernels and streams the same greedy text."""
    args = ["--checkpoint", str(checkpoint), "--prompt", "héllo", "--max-new-tokens", "6", "--dtype", "float32"]
    assert main(args) == 0
    reference = capsys.readouterr().out
    assert main([*args, "--kernels", "pallas"]) == 0
    assert capsys.readouterr().out == reference
    with pytest.raises(SystemExit):
        main([*args, "--kernels", "triton"])  # argparse lists the choices


def test_generate_command_errors(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"])
    with pytest.raises(SystemExit, match="neither a training directory"):
        main(["--checkpoint", str(tmp_path), "--prompt", "x"])
    with pytest.raises(SystemExit, match="greedy-only"):
        main(["--checkpoint", str(checkpoint), "--prompt", "x", "--speculative", "--temperature", "0.5"])


def test_chat_template_with_a_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = [BOS, USER, ASSISTANT, "<think>", "</think>"]
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(tmp_path / "tokenizer.json"))
    codec, has_template = codec_for(MICRO, str(tmp_path))
    assert has_template and isinstance(codec, HFTokenizerCodec)
    ids = {s: tok.token_to_id(s) for s in specials}
    assert codec.encode_prompt("hello world", "expert").tolist() == [
        ids[BOS], ids[USER], 1, 2, ids[ASSISTANT], ids["<think>"]]
    assert codec.encode_prompt("hello", "fast").tolist()[-1] == ids["</think>"]
    hi = [{"role": "user", "content": "hi"}]
    assert chat_prompt(hi, "fast") == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜></think>"
    feed = codec.stream_decoder()
    assert feed(np.array([1])) + feed(np.array([2])) == "hello world"
    codec, has_template = codec_for(MICRO, None)
    assert not has_template and codec.encode_prompt("A", "fast").tolist() == [0, 3 + ord("A")]
