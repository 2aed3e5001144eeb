"""Translation quality scores computed by sacreBLEU, so that the numbers mean what papers mean.

- **BLEU**: sacreBLEU's corpus BLEU (4-gram, exponential smoothing, brevity penalty) with its
  standard tokenizers: ``13a`` (the WMT default) for most target languages, ``zh`` for Chinese, and
  ``char`` for Japanese and Thai (sacreBLEU's own Japanese default needs MeCab, which is not a
  dependency); the tokenizer of each direction is in :func:`bleu_tokenizer`.
- **chrF**: sacreBLEU's chrF (character 6-grams, beta 2, no word n-grams): ``chrF2``.
- **chrF++**: the same with word 1- and 2-grams (``word_order=2``), reported under its own name.

Scores are on a 0-100 scale. :class:`CorpusStatistics` holds the sufficient statistics of BLEU so
that the BLEU of several directions pooled (each tokenized its own way) is one corpus BLEU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sacrebleu.metrics import BLEU, CHRF

__all__ = ["CorpusStatistics", "bleu_tokenizer", "translation_scores"]

#: sacreBLEU tokenizer of BLEU per target language; every other language uses ``13a``.
_BLEU_TOKENIZERS = {"zh": "zh", "ja": "char", "th": "char"}


def bleu_tokenizer(tgt_lang: str | None) -> str:
    """The sacreBLEU tokenizer BLEU uses for target language ``tgt_lang`` (``"13a"`` unless listed)."""
    return _BLEU_TOKENIZERS.get(tgt_lang or "", "13a")


@dataclass
class CorpusStatistics:
    """BLEU sufficient statistics (n-gram matches and totals, lengths), summable over directions."""

    correct: list[int] = field(default_factory=lambda: [0] * 4)
    total: list[int] = field(default_factory=lambda: [0] * 4)
    sys_len: int = 0
    ref_len: int = 0

    def add(self, hypotheses: Sequence[str], references: Sequence[str], tgt_lang: str | None = None) -> float:
        """Add a corpus of one direction; returns that corpus's own BLEU."""
        score = BLEU(tokenize=bleu_tokenizer(tgt_lang)).corpus_score(list(hypotheses), [list(references)])
        self.correct = [a + b for a, b in zip(self.correct, score.counts, strict=True)]
        self.total = [a + b for a, b in zip(self.total, score.totals, strict=True)]
        self.sys_len += score.sys_len
        self.ref_len += score.ref_len
        return float(score.score)

    def bleu(self) -> float:
        """Corpus BLEU of everything added (exponential smoothing, as sacreBLEU's default)."""
        return float(BLEU.compute_bleu(self.correct, self.total, self.sys_len, self.ref_len, smooth_method="exp").score)


def translation_scores(
    hypotheses: Sequence[str], references: Sequence[str], tgt_lang: str | None = None
) -> dict[str, float]:
    """The sacreBLEU ``bleu``, ``chrf`` and ``chrfpp`` of one corpus (one reference per sentence).

    Args:
        hypotheses: system outputs, detokenized.
        references: one reference per hypothesis.
        tgt_lang: target language code, which picks BLEU's tokenizer (:func:`bleu_tokenizer`).

    Returns:
        ``{"bleu": ..., "chrf": ..., "chrfpp": ...}`` on a 0-100 scale.

    Raises:
        ValueError: if the two lists differ in length.
    """
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; pass one reference per hypothesis"
        )
    hyps, refs = list(hypotheses), [list(references)]
    return {
        "bleu": float(BLEU(tokenize=bleu_tokenizer(tgt_lang)).corpus_score(hyps, refs).score),
        "chrf": float(CHRF().corpus_score(hyps, refs).score),
        "chrfpp": float(CHRF(word_order=2).corpus_score(hyps, refs).score),
    }
