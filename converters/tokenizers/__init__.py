"""Tokenizer converters: each source format to the JSON text of a Hugging Face
`tokenizers` tokenizer, plus its special-token ids. No sentencepiece or protobuf needed.

Every function returns `(json_str, specials)`, specials = {"bos", "eos", "unk", "pad"}
ids (None where the tokenizer has no such token), and raises `refimpl.errors.FormatError`
on malformed input.
"""
from .fairseq_dict import fairseq_dict_tokenizer_json
from .gpt2 import gpt2_tokenizer_json
from .llama2c import llama2c_tokenizer_json
from .sentencepiece_model import parse_model_proto, read_sentencepiece_model
from .spm import llama_tokenizer_json, sentencepiece_model_tokenizer_json, spm_bpe_tokenizer

__all__ = [
    "fairseq_dict_tokenizer_json",
    "gpt2_tokenizer_json",
    "llama2c_tokenizer_json",
    "llama_tokenizer_json",
    "parse_model_proto",
    "read_sentencepiece_model",
    "sentencepiece_model_tokenizer_json",
    "spm_bpe_tokenizer",
]
