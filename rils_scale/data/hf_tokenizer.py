"""The SentencePiece caption tokenizer as a Hugging Face ``tokenizers`` tokenizer.

OpenCLIP (``HFTokenizer``), ``transformers.AutoTokenizer`` and anything else that reads a
``tokenizer.json`` then produce the ids of :class:`rils_scale.data.tokenizer.Tokenizer`:
``[sot, pieces..., eot, pad...]``, truncated before ``eot``.

The conversion is exact rather than approximate because each SentencePiece stage has a
``tokenizers`` counterpart:

- normalisation: SentencePiece stores its rule (``nmt_nfkc_cf``: NFKC + case folding) as a
  precompiled character map inside the model; ``normalizers.Precompiled`` runs that same map;
  then runs of spaces collapse and the ends are stripped (``remove_extra_whitespaces``);
- whitespace: ``Metaspace`` replaces spaces by ``▁``, prepends one (``add_dummy_prefix``) and
  splits before each ``▁`` (``split_by_whitespace``);
- BPE: SentencePiece merges the adjacent pair whose merged piece scores highest (lowest id);
  every split of a piece into two vocabulary pieces becomes a merge ranked by that piece's id,
  so ``tokenizers``' lowest-rank-first merging picks the same pair (leftmost on ties in both);
- unknown characters map to ``<unk>`` (consecutive ones fused, as SentencePiece does), or to
  byte pieces when the model was trained with ``byte_fallback``;
- ``TemplateProcessing`` adds ``<sot>`` / ``<eot>``; truncation to the context length keeps
  room for both, as :class:`Tokenizer` does;
- the four specials are named ``"<pad  >"``, ``"<unk  >"``, ``"<sot  >"``, ``"<eot  >"`` (two
  spaces) in ``tokenizer.json`` so that no cleaned caption can contain them: SentencePiece
  never produces a special from text, while an added token under its plain name would be
  matched in a caption that happens to contain, say, ``"<eot>"``.

Needs ``tokenizers`` and ``protobuf`` (to read the model proto); neither is imported by the
trainer.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

from .tokenizer_training import EOT_ID, PAD_ID, SOT_ID, UNK_ID

# sentencepiece_model.proto: ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def special_token_name(piece: str) -> str:
    """``"<eot>"`` -> ``"<eot  >"``: the name of a special in ``tokenizer.json`` (see below)."""
    return piece[:-1] + "  >"


def _load_proto(serialized: bytes):
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(serialized)
    return proto


def _bpe_merges(vocab: Dict[str, int], mergeable: List[str]) -> List[Tuple[str, str]]:
    """Every (left, right) split of each mergeable piece, ranked by the merged piece's id."""
    merges = []
    for piece in mergeable:
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def build_hf_tokenizer(serialized_model: bytes):
    """A ``tokenizers.Tokenizer`` equal to the SentencePiece model (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    proto = _load_proto(serialized_model)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != 2:  # TrainerSpec.ModelType.BPE
        raise ValueError("only SentencePiece BPE models convert exactly (this one is not BPE)")
    if not (norm.add_dummy_prefix and norm.remove_extra_whitespaces and norm.escape_whitespaces):
        raise ValueError("the conversion assumes SentencePiece's default whitespace handling")
    if not trainer.split_by_whitespace:
        raise ValueError("the conversion assumes split_by_whitespace=true")
    pieces = [(p.piece, p.type) for p in proto.pieces]
    specials = {UNK_ID: "<unk>", PAD_ID: "<pad>", SOT_ID: "<sot>", EOT_ID: "<eot>"}
    for i, name in specials.items():
        if pieces[i][0] != name:
            raise ValueError(f"id {i} is {pieces[i][0]!r}, expected {name!r}: train it with rils_scale.data.train_tokenizer")
    # The specials get names that cleaned text cannot contain (a double space: OpenCLIP's
    # whitespace cleaning and our normaliser collapse runs of spaces). Under their plain names a
    # caption containing the literal text "<eot>" would be matched as the special token by the
    # added-token pass, where SentencePiece encodes it as ordinary characters.
    names = {i: special_token_name(n) for i, n in specials.items()}
    pieces = [(names.get(i, piece), kind) for i, (piece, kind) in enumerate(pieces)]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    mergeable = [piece for piece, kind in pieces if kind == _NORMAL and len(piece) > 1]
    merge_vocab = {piece: i for i, (piece, kind) in enumerate(pieces) if kind in (_NORMAL, _USER_DEFINED)}
    tok = Tokenizer(BPE(vocab, _bpe_merges(merge_vocab, mergeable), unk_token=names[UNK_ID], fuse_unk=True,
                        byte_fallback=bool(trainer.byte_fallback)))
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Sequence(([decoders.ByteFallback()] if trainer.byte_fallback else []) +
                                    [decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tok.post_processor = processors.TemplateProcessing(
        single=[names[SOT_ID], "$A", names[EOT_ID]],  # lists: the names contain spaces
        pair=[names[SOT_ID], "$A", names[EOT_ID], "$B", names[EOT_ID]],
        special_tokens=[(names[SOT_ID], SOT_ID), (names[EOT_ID], EOT_ID)])
    # the specials are never produced from text; declaring them special keeps them whole on decode
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for _, name in sorted(names.items())])
    return tok


def write_hf_tokenizer(serialized_model: bytes, out_dir: str, context_length: int) -> List[str]:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``special_tokens_map.json``) for
    ``transformers.AutoTokenizer.from_pretrained(out_dir)``; returns the paths."""
    tok = build_hf_tokenizer(serialized_model)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
    tok.save(paths[0])
    special = {"bos_token": special_token_name("<sot>"), "eos_token": special_token_name("<eot>"),
               "unk_token": special_token_name("<unk>"), "pad_token": special_token_name("<pad>")}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
              "padding_side": "right", "truncation_side": "right", "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False,  # the post-processor adds them
              **special}
    with open(paths[1], "w") as f:
        json.dump(config, f, indent=2)
    with open(paths[2], "w") as f:
        json.dump(special, f, indent=2)
    return paths
