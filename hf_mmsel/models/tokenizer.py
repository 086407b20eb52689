"""A small word-level caption tokenizer trained with the ``tokenizers`` library.

Used by the random-init CLIP builder: the vocabulary is learnt from the training captions and every encoded
sequence is ``<s> words </s>``. ``</s>`` gets the *largest* id of the vocabulary, like OpenAI CLIP's EOS,
so that CLIP's text pooling (which takes the hidden state at the EOS position) pools the EOS token.
"""

from __future__ import annotations

from collections.abc import Iterable

BOS_TOKEN, PAD_TOKEN, UNK_TOKEN, EOS_TOKEN = "<s>", "<pad>", "<unk>", "</s>"


def train_caption_tokenizer(captions: Iterable[str], *, vocab_size: int = 1000, max_length: int = 32):
    """Train a lower-cased word-level tokenizer on ``captions`` and wrap it as ``PreTrainedTokenizerFast``.

    Ids: ``<s>``=0 (bos), ``<pad>``=1, ``<unk>``=2, words 3.., ``</s>`` = last id (eos). ``max_length`` is
    the longest encoded sequence including ``<s>``/``</s>``; longer captions are truncated (keeping ``</s>``).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    captions = [str(c) for c in captions]
    if not captions:
        raise ValueError("train_caption_tokenizer needs at least one caption, got an empty list")
    if vocab_size < 5:
        raise ValueError(f"vocab_size must be >= 5 (4 special tokens + 1 word), got {vocab_size}")
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 (<s>, one token, </s>), got {max_length}")

    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size - 1, min_frequency=1, special_tokens=[BOS_TOKEN, PAD_TOKEN, UNK_TOKEN]
    )
    tok.train_from_iterator(captions, trainer=trainer)
    tok.add_special_tokens([EOS_TOKEN])  # appended after the learnt vocabulary -> largest id
    bos_id, eos_id = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
    )
