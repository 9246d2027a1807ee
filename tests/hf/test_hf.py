"""The Hugging Face format: an export folder that AutoModelForCausalLM / AutoTokenizer load after `import atlas_train`,
for every family member, with the native model's logits, atlas-generate's greedy tokens (the recurrent cache carried
through generate(), left-padded batches included) and sentencepiece's encoding."""

from __future__ import annotations

import dataclasses
import lzma
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch

import atlas_train  # noqa: F401  (registers the Auto classes when transformers' are imported)
from atlas_train.eval.generate import generate as atlas_generate
from atlas_train.model.config import MIXERS
from eval_helpers import train_tokenizer, write_export
from repo_paths import REPO

transformers = pytest.importorskip("transformers")
from atlas_train.hf.cache import AtlasCache, CacheGroup  # noqa: E402
from atlas_train.hf.convert import export_hf  # noqa: E402
from atlas_train.hf.tokenizer import hf_tokenizer  # noqa: E402
from atlas_train.train.export import load_exported  # noqa: E402

MEMBERS = [(mixer, {}) for mixer in MIXERS] + [("atlas", {"feature_map": "exact", "update": "token"})]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def _sample_lines() -> list[str]:
    text = lzma.decompress((REPO / "data" / "corpus" / "kjv.txt.xz").read_bytes()).decode()
    lines = text[300_000:700_000].split("\n")[::2]
    return lines + ["  two leading spaces\n\n\ttab, digits 0123456789 and café 日本語 🙂", "", " ", "\n", "x  y   z\n"]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_encodes_and_decodes_as_sentencepiece(tmp_path, tokenizer_path, model_type):
    from atlas_train.data_prep.tokenizer import train_tokenizer as prep_train_tokenizer

    if model_type == "unigram":
        text = lzma.decompress((REPO / "data" / "corpus" / "kjv.txt.xz").read_bytes()).decode()[:300_000]
        tokenizer_path = prep_train_tokenizer(iter(text.split("\n")), tmp_path / "uni.model", 800, "unigram", 1 << 20)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    hf_tokenizer(tokenizer_path).save_pretrained(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    lines = _sample_lines()
    assert len(lines) > 1000
    for line in lines:
        ids = sp.encode(line)
        assert tok.encode(line) == ids, line
        assert tok.decode(ids) == sp.decode(ids) == line, line
    assert tok.eos_token_id == sp.eos_id() and tok.padding_side == "left"


def _tiny_export(root, tokenizer_path, mixer, extra):
    return write_export(root / "export", tokenizer_path, mixer=mixer, init_std=0.3, **extra)


@pytest.mark.parametrize("mixer,extra", MEMBERS, ids=[m + ("_exact" if e else "") for m, e in MEMBERS])
def test_hf_export_gives_native_logits_and_atlas_generate_tokens(tmp_path, tokenizer_path, mixer, extra):
    native, _, _ = load_exported(_tiny_export(tmp_path, tokenizer_path, mixer, extra))
    out = export_hf(tmp_path / "export", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "AtlasForCausalLM" and model.config.atlas == dataclasses.asdict(native.config)
    assert all(torch.equal(a, b) for a, b in zip(model.model.state_dict().values(), native.state_dict().values()))
    ids = torch.randint(3, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, native(ids).logits)

    # Greedy decoding, one prompt: the same tokens as atlas-generate, one T=1 forward per new token.
    calls = []
    model.model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    prompt = ids[0, :9]
    expected = atlas_generate(native, prompt, 10)
    calls.clear()
    got = model.generate(prompt[None], max_new_tokens=10, do_sample=False)
    assert torch.equal(got[0], expected)
    assert calls == [9] + [1] * 9  # the cache is carried: the prompt once, then single tokens

    # A left-padded batch of prompts of different lengths: each row as it would decode alone (float64, so that
    # batching changes no rounding that could flip an argmax).
    native64, model64 = native.double(), model.double()
    prompts = [ids[0, :9], ids[1, :4], ids[1, 3:12]]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, p in enumerate(prompts):
        batch[row, width - len(p):], mask[row, width - len(p):] = p, 1
    got = model64.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        padded_logits = model64(batch, attention_mask=mask).logits
    for row, p in enumerate(prompts):
        assert torch.equal(got[row, width:], atlas_generate(native64, p, 6)[len(p):]), row
        with torch.no_grad():
            alone = native64(p[None]).logits[0]
        torch.testing.assert_close(padded_logits[row, width - len(p):], alone, rtol=1e-10, atol=1e-10)


def test_labels_loss_beams_and_refused_masks(tmp_path, tokenizer_path):
    native, _, _ = load_exported(_tiny_export(tmp_path, tokenizer_path, "atlas_mag", {}))
    model = transformers.AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "export", tmp_path / "hf"))
    ids = torch.randint(3, 1024, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
        shifted = torch.cat((ids[:, 1:], torch.full((2, 1), -100)), 1)
        assert torch.equal(loss, native(ids, labels=shifted).loss)
        beams = model.generate(ids[:1], max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
        assert beams.shape == (2, 17)
        right = torch.ones_like(ids)
        right[1, 8:] = 0  # right padding: exact for the real positions, but no cache can continue it
        out = model(ids, attention_mask=right)
        assert torch.equal(out.logits, native(ids).logits) and out.past_key_values is None
        with pytest.raises(ValueError, match="right-padded"):
            model(ids, attention_mask=right, use_cache=True)
        holes = torch.ones_like(ids)
        holes[0, 5] = 0
        with pytest.raises(ValueError, match="one run of ones"):
            model(ids, attention_mask=holes)


def test_cache_row_selection_follows_the_rows_across_groups():
    """select_rows (beam reordering, expansion) against a per-row reference, over two padding groups."""
    rows = torch.randn(5, 3, 2)  # one state tensor per batch row
    groups = [CacheGroup(torch.tensor([0, 3]), {"s": rows[[0, 3]], "pos": torch.tensor(4)}),
              CacheGroup(torch.tensor([1, 2, 4]), {"s": rows[[1, 2, 4]], "pos": torch.tensor(2)})]
    cache = AtlasCache(groups, seen_tokens=7)
    index = torch.tensor([3, 3, 1, 0, 4, 2, 2])
    cache.select_rows(index)
    assert cache.batch_size == len(index) and cache.get_seq_length() == 7
    covered = sorted(int(r) for group in cache.groups for r in group.rows)
    assert covered == list(range(len(index)))
    for group in cache.groups:
        assert torch.equal(group.state["s"], rows[index[group.rows]])


@pytest.mark.slow
def test_a_fresh_process_loads_the_folder_after_import_atlas_train(tmp_path, tokenizer_path):
    """The user's path, in a clean interpreter: import atlas_train, then the Auto classes (about 20 s: imports)."""
    _tiny_export(tmp_path, tokenizer_path, "atlas", {})
    out = export_hf(tmp_path / "export", tmp_path / "hf")
    script = (
        "import sys, atlas_train\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"tok = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "ids = tok('In the beginning', return_tensors='pt').input_ids\n"
        "print(tok.decode(model.generate(ids, max_new_tokens=4, do_sample=False)[0]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("In the beginning")


def test_a_run_prepared_with_a_tokenizer_json_exports_and_generates(tmp_path, capsys):
    """A dataset tokenized with a Hugging Face tokenizer.json: its export carries that file under its own name, which
    the Hugging Face folder and atlas-generate both use (and no tokenizer.model beside it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from atlas_train.eval.generate import main as generate_main

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_sample_lines()[:500], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    export = write_export(tmp_path / "export", tmp_path / "tokenizer.json", mixer="titans")
    assert generate_main(["--checkpoint", str(export), "--prompt", "In the beginning", "--max-new-tokens", "5",
                          "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("In the beginning")
    out = export_hf(export, tmp_path / "hf")
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.model").exists()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for line in _sample_lines()[500:700]:
        assert hf_tok.encode(line) == tok.encode(line, add_special_tokens=False).ids
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.padding_side == "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.eos_token_id == tok.token_to_id("<|endoftext|>")
