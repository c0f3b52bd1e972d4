"""Small random Llama-family checkpoints saved with transformers' `save_pretrained`,
for exactness tests against transformers as the oracle."""

from __future__ import annotations

import os

import torch

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.2,  # peaky logits, so float noise cannot flip a greedy argmax
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)


def make_checkpoint(
    arch: str, directory: str, seed: int = 0, initializer_range: float | None = None, **overrides
):
    """Save a random checkpoint of `arch` into `directory`; return the HF model (float32, eval).
    `overrides` replace COMMON's config values (e.g. num_key_value_heads=1).

    The default init is peaky on purpose (greedy margins far above float noise); pass
    `initializer_range=0.02` (transformers' default) for realistic activation scales.
    """
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(COMMON, **overrides)
    if initializer_range is not None:
        common["initializer_range"] = initializer_range
    if arch == "llama":
        cfg = tf.LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None, tie_word_embeddings=True)
        model = tf.MistralForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=True)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
        model = tf.Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model = model.float().eval()
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return model


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def save_chat_tokenizer(directory: str, template: str) -> None:
    """A small byte-level BPE tokenizer with Llama-3-style special tokens and `template` as its
    chat template, saved with transformers' `save_pretrained` into `directory`."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 10, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token="<|eot_id|>")
    fast.chat_template = template
    fast.save_pretrained(directory)
