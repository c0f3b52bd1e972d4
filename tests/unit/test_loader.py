"""Loading Hugging Face directories: sharded safetensors, tokenizer.json, clear errors."""

import os

import pytest

from pdserve.engine import LLM, SamplingParams
from tests.hf_models import hf_greedy, make_checkpoint


def test_sharded_checkpoint_loads_and_matches(tmp_path):
    model = make_checkpoint("qwen2", str(tmp_path / "full"))
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    prompt = list(range(3, 40))
    llm = LLM(str(sharded), num_gpu_blocks=64)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(model, prompt, 8)
    # a shard listed in the index but missing is one clear error
    shard = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[0]
    os.remove(sharded / shard)
    with pytest.raises(ValueError, match="missing"):
        LLM(str(sharded))


def test_missing_weights_and_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))
    make_checkpoint("llama", str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(tmp_path))
    # load_format="dummy" builds the same shapes with random weights, no files needed
    llm = LLM(str(tmp_path), load_format="dummy", num_gpu_blocks=16)
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].token_ids) == 2


def test_tokenizer_json_round_trip(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    make_checkpoint("llama", str(tmp_path))
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[UNK]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 10, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    llm = LLM(str(tmp_path), num_gpu_blocks=32)
    out = llm.generate(["hello world"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) == 6
    full = llm.tokenizer.decode(out.prompt_token_ids + out.token_ids)
    assert full == llm.tokenizer.decode(out.prompt_token_ids) + out.text
