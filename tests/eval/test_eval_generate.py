"""Recurrent generation: greedy decoding with the cache equals greedy decoding with the full forward, the cache is
what carries the context (T=1 calls after the prompt, constant state for memory models), and streaming text."""

from types import SimpleNamespace

import pytest
import torch

from atlas_train.eval.generate import TextStreamer, generate


class GRUDouble(torch.nn.Module):
    """A tiny GRU LM with AtlasLM's forward contract: exercises the decoding loop without the real model."""

    def __init__(self, vocab: int = 17, width: int = 8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.rnn = torch.nn.GRU(width, width, batch_first=True)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, doc_start=None, labels=None, cache=None, use_cache=False):
        y, h = self.rnn(self.emb(input_ids), None if cache is None else cache["h"])
        return SimpleNamespace(logits=self.head(y), loss=None, cache={"h": h} if use_cache else None)


def full_forward_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The obviously-right decoder: rerun the whole sequence for every new token."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


def recording_calls(model):
    """Wrap model.forward to record the length T of every call."""
    lengths = []
    inner = model.forward

    def forward(input_ids, *args, **kwargs):
        lengths.append(input_ids.shape[1])
        return inner(input_ids, *args, **kwargs)

    model.forward = forward
    return lengths


def test_loop_greedy_equals_full_forward_and_streams():
    torch.manual_seed(0)
    model = GRUDouble().double()
    prompt = torch.randint(0, 17, (3, 9))
    seen = []
    out = generate(model, prompt, 12, on_token=seen.append)
    assert out.shape == (3, 21) and torch.equal(out[:, :9], prompt)
    assert torch.equal(out, full_forward_greedy(model, prompt, 12))
    assert torch.equal(torch.stack(seen, 1), out[:, 9:])
    assert torch.equal(generate(model, prompt, 12, prefill_chunk=4), out)  # prompt in segments through the cache
    assert torch.equal(generate(model, prompt[0], 12), out[0])  # 1-D in, 1-D out


def test_loop_sampling_is_seeded_and_restores_mode():
    torch.manual_seed(0)
    model = GRUDouble().train()
    prompt = torch.randint(0, 17, (2, 5))
    draw = lambda seed: generate(  # noqa: E731
        model, prompt, 20, temperature=1.0, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(seed)
    )
    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training


def test_loop_stops_at_eos_and_pads_finished_rows():
    torch.manual_seed(0)
    model = GRUDouble()
    prompt = torch.randint(0, 17, (4, 3))
    free = generate(model, prompt, 10)[:, 3:].tolist()
    eos = free[0][2]  # row 0 produces it at its third new token
    out = generate(model, prompt, 10, eos_id=eos)[:, 3:].tolist()
    cuts = [row.index(eos) if eos in row else None for row in free]
    expected_len = 10 if None in cuts else max(cuts) + 1  # stops once every row is done
    for new, free_new, cut in zip(out, free, cuts):
        assert len(new) == expected_len
        if cut is None:
            assert new == free_new[:expected_len]
        else:
            assert new[: cut + 1] == free_new[: cut + 1] and set(new[cut:]) == {eos}
    assert generate(model, prompt[:1], 10, eos_id=eos).shape == (1, 3 + cuts[0] + 1)  # a lone row stops at its EOS


def test_streamer_holds_back_incomplete_characters():
    # ids are bytes; decoding with errors="replace" mimics sentencepiece's byte fallback on a cut character.
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    written = []
    prompt = list("naïve ".encode())
    streamer = TextStreamer(decode, written.append, prompt)
    assert streamer.printed == "naïve "
    for b in "café ☕".encode():
        streamer(torch.tensor([b]))
    assert "\ufffd" not in "".join(written)
    assert streamer.finish() == "naïve café ☕" and "".join(written) == "café ☕"


# --- the real model family -------------------------------------------------------------------------------------

MIXERS = ["atlas", "atlas_pp", "omeganet", "titans", "dla", "transformer", "atlas_mag", "atlas_mal"]


def tiny_model(mixer: str):
    from atlas_train.model import build_model
    from atlas_train.model.config import ModelConfig

    cfg = ModelConfig(
        mixer=mixer,
        vocab_size=64,
        d_model=16,
        n_layers=2,
        n_heads=2,
        mlp_hidden=32,
        max_seq_len=64,
        chunk_size=4,
        window=3 if mixer in ("atlas", "atlas_pp", "omeganet", "atlas_mag", "atlas_mal") else None,
        memory_expansion=2,
        swa_window=6,
        gate_rank=4,
    )
    torch.manual_seed(0)
    return build_model(cfg).double().eval()


def cache_numel(cache: dict) -> int:
    return sum(t.numel() for t in cache.values())


@pytest.mark.parametrize("mixer", MIXERS)
def test_model_greedy_generate_equals_full_forward(mixer):
    model = tiny_model(mixer)
    prompt = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    lengths = recording_calls(model)
    out = generate(model, prompt, 8)
    assert lengths == [10] + [1] * 7  # one prompt pass, then one T=1 step per token
    assert torch.equal(out, full_forward_greedy(model, prompt, 8))
    assert torch.equal(generate(model, prompt, 8, prefill_chunk=4), out)


def test_transformer_generate_fills_its_kv_cache_in_place():
    """40 generated tokens move the KV cache to a bigger buffer 3 times (its capacity doubles), not once per token,
    and still decode like the full forward."""
    model = tiny_model("transformer")
    prompt = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    want = full_forward_greedy(model, prompt, 40)
    pointers, inner = [], model.forward

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        pointers.append(out.cache["layers.1.mixer.v"].data_ptr())
        return out

    model.forward = forward
    assert torch.equal(generate(model, prompt, 40), want)
    assert len(pointers) == 40 and sum(a != b for a, b in zip(pointers, pointers[1:])) == 3  # 10 -> 22 -> 46 -> 94


@pytest.mark.parametrize("mixer", ["atlas", "titans", "transformer"])
def test_memory_state_stays_constant_while_attention_cache_grows(mixer):
    model = tiny_model(mixer)
    with torch.no_grad():
        out = model(torch.randint(0, 64, (1, 8)), use_cache=True)
        sizes = [cache_numel(out.cache)]
        for _ in range(6):
            out = model(torch.randint(0, 64, (1, 1)), cache=out.cache, use_cache=True)
            sizes.append(cache_numel(out.cache))
    if mixer == "transformer":
        assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    else:
        assert len(set(sizes)) == 1


@pytest.mark.parametrize("mixer", ["atlas", "titans", "atlas_mag", "transformer"])
def test_graphed_decode_steps_generate_the_same_tokens(mixer, monkeypatch):
    """`cuda_graph=True` decodes through StaticDecodeStep (on a CPU its static buffers without a graph) and gives the
    tokens plain decoding gives, for the hybrid too (its sliding-window cache keeps its size); the transformer's
    growing KV cache falls back to plain steps."""
    from atlas_train.eval import static_decode

    built = []
    real = static_decode.StaticDecodeStep

    class Spy(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(static_decode, "StaticDecodeStep", Spy)
    model = tiny_model(mixer)
    prompt = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    want = generate(model, prompt, 9)
    assert not built
    assert torch.equal(generate(model, prompt, 9, cuda_graph=True), want)
    assert len(built) == (0 if mixer == "transformer" else 1)


def test_cli_refuses_cuda_graph_without_a_gpu(capsys):
    from atlas_train.eval.generate import main

    assert main(["--checkpoint", "missing", "--prompt", "x", "--cuda-graph", "--device", "cpu"]) == 2
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err
