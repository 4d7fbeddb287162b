"""The embedded default corpus: a toy language generated in code, so `train` needs no download.

Documents are sequences of sentences from a small probabilistic grammar,

    sentence := NP(subject) VERB NP(object) [PREP NP] "."      NP := DET ADJ{0,2} NOUN

with structure at several ranges, so a Transformer's loss keeps falling as it learns more of it:
  * syntax: which word class follows which (a bigram model gets this);
  * agreement: the verb's number (singular/plural form) matches the subject noun's, several tokens
    back across adjectives: attention is needed;
  * topic: each document draws one of `NUM_TOPICS` topics and takes most nouns and verbs from it,
    so the first nouns of a document predict the later ones (in-context);
  * repetition: some sentences repeat an earlier sentence of the same document verbatim, which an
    induction head can copy.
Words within a class follow a Zipf law. The generator is pure Python on `random.Random`, whose
output is stable across platforms and versions, so a seed always gives the same tokens.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np

NUM_TOPICS = 8
NOUNS_PER_TOPIC = 16
NUM_VERBS = 32
NUM_ADJECTIVES = 32
NUM_PREPOSITIONS = 8
NUM_DETERMINERS = 4  # per grammatical number
TOPIC_NOUN_SHARE = 0.8  # the rest of the nouns come from any topic
TOPIC_VERB_SHARE = 0.7
REPEAT_PROBABILITY = 0.2
SENTENCES_PER_DOCUMENT = (3, 12)


def _zipf(n: int) -> list[float]:
    """Cumulative Zipf(1) weights over n items, for random.choices(cum_weights=...)."""
    total, cumulative = 0.0, []
    for rank in range(1, n + 1):
        total += 1.0 / rank
        cumulative.append(total)
    return cumulative


class _Vocabulary:
    """Token ids of each word class; singular and plural forms of a word are adjacent ids."""

    def __init__(self) -> None:
        self.eos, self.period = 0, 1
        next_id = 2
        self.det = [list(range(next_id, next_id + NUM_DETERMINERS)),  # [singular, plural]
                    list(range(next_id + NUM_DETERMINERS, next_id + 2 * NUM_DETERMINERS))]
        next_id += 2 * NUM_DETERMINERS
        self.adjectives = list(range(next_id, next_id + NUM_ADJECTIVES))
        next_id += NUM_ADJECTIVES
        self.prepositions = list(range(next_id, next_id + NUM_PREPOSITIONS))
        next_id += NUM_PREPOSITIONS
        self.noun_base, next_id = next_id, next_id + 2 * NUM_TOPICS * NOUNS_PER_TOPIC
        self.verb_base, next_id = next_id, next_id + 2 * NUM_VERBS
        self.size = next_id

    def noun(self, lemma: int, plural: int) -> int:
        return self.noun_base + 2 * lemma + plural

    def verb(self, lemma: int, plural: int) -> int:
        return self.verb_base + 2 * lemma + plural


VOCAB = _Vocabulary()
VOCAB_SIZE = VOCAB.size
"""Number of distinct token ids the corpus uses (ids are 0 … VOCAB_SIZE-1; 0 ends a document)."""
EOT_ID = VOCAB.eos
"""The end-of-text id: the last token of every document (what `train --pack-documents` splits at)."""

_ZIPF_NOUNS = _zipf(NOUNS_PER_TOPIC)
_ZIPF_VERBS = _zipf(NUM_VERBS // NUM_TOPICS)
_ZIPF_ADJECTIVES = _zipf(NUM_ADJECTIVES)


class _DocumentWriter:
    """Draws documents of one topic at a time from a seeded random.Random."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def noun_phrase(self, topic: int, plural: int) -> list[int]:
        rng = self.rng
        words = [rng.choice(VOCAB.det[plural])]
        words += rng.choices(VOCAB.adjectives, cum_weights=_ZIPF_ADJECTIVES, k=rng.choice((0, 0, 1, 2)))
        if rng.random() >= TOPIC_NOUN_SHARE:
            topic = rng.randrange(NUM_TOPICS)
        lemma = rng.choices(range(NOUNS_PER_TOPIC), cum_weights=_ZIPF_NOUNS)[0]
        return words + [VOCAB.noun(topic * NOUNS_PER_TOPIC + lemma, plural)]

    def verb(self, topic: int, plural: int) -> int:
        rng, per_topic = self.rng, NUM_VERBS // NUM_TOPICS
        if rng.random() >= TOPIC_VERB_SHARE:
            return VOCAB.verb(rng.randrange(NUM_VERBS), plural)
        lemma = rng.choices(range(per_topic), cum_weights=_ZIPF_VERBS)[0]
        return VOCAB.verb(topic * per_topic + lemma, plural)

    def sentence(self, topic: int) -> list[int]:
        rng = self.rng
        plural = rng.randrange(2)  # the subject's number, which the verb must agree with
        words = self.noun_phrase(topic, plural) + [self.verb(topic, plural)]
        words += self.noun_phrase(topic, rng.randrange(2))
        if rng.random() < 0.3:
            words += [rng.choice(VOCAB.prepositions), *self.noun_phrase(topic, rng.randrange(2))]
        return words + [VOCAB.period]

    def document(self) -> list[int]:
        topic = self.rng.randrange(NUM_TOPICS)
        sentences: list[list[int]] = []
        for _ in range(self.rng.randint(*SENTENCES_PER_DOCUMENT)):
            if sentences and self.rng.random() < REPEAT_PROBABILITY:
                sentences.append(self.rng.choice(sentences))
            else:
                sentences.append(self.sentence(topic))
        return [token for sentence in sentences for token in sentence] + [VOCAB.eos]


@functools.lru_cache(maxsize=8)
def generate(num_tokens: int, seed: int) -> np.ndarray:
    """`num_tokens` token ids (uint16, read-only) of whole documents, cut at the end; cached per process."""
    writer, tokens = _DocumentWriter(random.Random(seed)), []
    while len(tokens) < num_tokens:
        tokens.extend(writer.document())
    array = np.asarray(tokens[:num_tokens], dtype=np.uint16)
    array.flags.writeable = False  # shared by the cache: nobody may modify it
    return array


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """Size and seed of the embedded corpus."""

    seed: int = 0
    """Train split uses seed 2*seed, validation 2*seed+1: disjoint random streams."""
    train_tokens: int = 500_000
    """Tokens in the training split (~0.3 s to generate)."""
    val_tokens: int = 50_000
    """Tokens in the validation split."""

    def __post_init__(self) -> None:
        if self.train_tokens <= 0 or self.val_tokens <= 0:
            raise ValueError("corpus splits must have a positive number of tokens")


def load_corpus(config: CorpusConfig = CorpusConfig()) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) uint16 token arrays of the embedded corpus, both with ids < VOCAB_SIZE."""
    return generate(config.train_tokens, 2 * config.seed), generate(config.val_tokens, 2 * config.seed + 1)
