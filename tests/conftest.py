"""Shared fixtures. Unit tests run on a tiny, randomly initialised Llama model with a tokenizer
trained in the test session, saved as a normal local HF model directory (so they also
exercise `--base-model PATH`). Only tests marked `slow` load the real default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CORPUS = [
    "My dog's name is Max and he is a beagle.", "I'm allergic to penicillin.", "My sister Anna lives in Berlin.",
    "I work at Acme Corp as a data engineer.", "My favourite food is sushi.", "My car is a blue Mazda 3.",
    "personal pet max health allergy penicillin family sibling anna work job acme food favorite sushi",
    "What is my dog called? Where does my sister live? Which medicine am I allergic to?",
    "Question: Memory: the a of to in is was what who where when how my your I",
] * 20


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with a 600-token BPE vocabulary, saved with its tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                      initializer_range=0.2)  # large enough weights for LoRA to learn in a few steps
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def tiny_config_for(model: Path):
    from ipm import Config

    # Both decodings calibrated: the tests ask each of the same index.
    return Config(base_model=str(model), epochs=30, lora_layers=2, lora_r=8, batch_size=16,
                  learning_rate=5e-3, questions_per_memory=8, beam_size=4, also_calibrate=["pure"])


@pytest.fixture
def tiny_config(tiny_model):
    return tiny_config_for(tiny_model)


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def mem(home, tiny_config, tmp_path):
    import ipm

    m = ipm.open(home, config=tiny_config, cache=tmp_path / "cache")
    yield m
    m.store.close()


MEMORIES = {
    "personal_pet_max": "My dog's name is Max and he is a beagle.",
    "health_allergy_penicillin": "I'm allergic to penicillin.",
    "family_sister_anna": "My sister Anna lives in Berlin.",
    "work_job_acme": "I work at Acme Corp as a data engineer.",
}


@pytest.fixture
def memories_file(tmp_path) -> Path:
    p = tmp_path / "memories.json"
    p.write_text(json.dumps(MEMORIES))
    return p
