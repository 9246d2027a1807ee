"""The project's sentencepiece model as a Hugging Face fast tokenizer that encodes and decodes the same way.

atlas-prep trains sentencepiece with identity normalisation, no dummy prefix, byte fallback and "\\n" as a
user-defined piece. The equivalent `tokenizers` pipeline: spaces become "▁", user-defined pieces are matched first
as added tokens, the sentencepiece vocabulary drives a BPE (merges ordered by piece score, as sentencepiece merges
by score) or Unigram model with byte fallback, and decoding maps "▁" back to spaces and fuses byte pieces. No BOS
or EOS is added to encoded text, as the native tools add none. One difference, the usual one of Hugging Face
tokenizers: the literal text of a control piece ("</s>") encodes as that special token, where sentencepiece spells
it out in characters.
"""

from __future__ import annotations

from pathlib import Path

# sentencepiece_model.proto piece types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _read_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def _check_supported(proto, path: Path) -> None:
    """Refuse sentencepiece options the conversion does not reproduce (rather than encode differently)."""
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        raise ValueError(f"{path}: only identity-normalised sentencepiece models convert exactly (this one uses "
                         f"{norm.name!r}); train it with normalization_rule_name=identity as atlas-prep does")
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        raise ValueError(f"{path}: add_dummy_prefix and remove_extra_whitespaces must be off (atlas-prep's settings)")
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE
        raise ValueError(f"{path}: sentencepiece model type {proto.trainer_spec.model_type} is not BPE or unigram")


def backend_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` equivalent to the sentencepiece model at `path`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.tokenization_utils_base import generate_merges

    path = Path(path)
    proto = _read_proto(path)
    _check_supported(proto, path)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk_id = proto.trainer_spec.unk_id
    byte_fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == 1:
        model = models.Unigram([(piece, score) for piece, score, _ in pieces], unk_id=unk_id,
                               byte_fallback=byte_fallback)
    else:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        learned = {piece: score for piece, score, kind in pieces if kind == _NORMAL}
        merges = generate_merges(vocab, learned)
        model = models.BPE(vocab, merges, unk_token=pieces[unk_id][0], fuse_unk=True, byte_fallback=byte_fallback)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_tokens([AddedToken(piece, normalized=False, special=False)
                          for piece, _, kind in pieces if kind == _USER_DEFINED])
    tokenizer.add_special_tokens([AddedToken(piece, normalized=False, special=True)
                                  for piece, _, kind in pieces if kind in (_CONTROL, _UNKNOWN)])
    return tokenizer


def hf_tokenizer(path: str | Path):
    """A `PreTrainedTokenizerFast` for the tokenizer at `path` (a sentencepiece model, or the Hugging Face
    tokenizer.json a dataset was prepared with), padding on the left (what batched generation of a recurrent model
    needs: see AtlasForCausalLM) with EOS when there is no pad token (padding is masked, never read)."""
    from transformers import PreTrainedTokenizerFast

    from atlas_train.data_prep.tokenizer import TOKENIZERS, JsonTokenizer, tokenizer_kind

    if tokenizer_kind(path) == TOKENIZERS:
        json_tokenizer = JsonTokenizer(Path(path))
        eos = json_tokenizer.id_to_piece(json_tokenizer.eos_id()) if json_tokenizer.eos_id() >= 0 else None
        return PreTrainedTokenizerFast(tokenizer_file=str(path), padding_side="left", eos_token=eos, pad_token=eos)
    proto = _read_proto(Path(path))
    ids = {"unk": proto.trainer_spec.unk_id, "eos": proto.trainer_spec.eos_id, "bos": proto.trainer_spec.bos_id,
           "pad": proto.trainer_spec.pad_id}
    special = {f"{name}_token": proto.pieces[i].piece for name, i in ids.items() if i >= 0}
    if "eos_token" in special:
        special.setdefault("pad_token", special["eos_token"])
    return PreTrainedTokenizerFast(tokenizer_object=backend_tokenizer(path), padding_side="left",
                                   add_bos_token=False, add_eos_token=False, **special)
