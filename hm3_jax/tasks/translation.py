"""Task "translation": English sentences into Velan, a synthetic rule-based language.

English comes from a small grammar over a fixed lexicon::

    S  -> NP_subj V NP_obj [Adv]
    NP -> Det [Adj] Noun            (singular: "the"/"a", plural: "the"/"some")

Velan is derived from the English parse by four rules, so the mapping is a function of the sentence:

1. word substitution through the lexicon below;
2. word order S O V with the adverb first: ``[Adv] NP_subj NP_obj V``;
3. noun phrases are ``Noun [Adj] Det`` (determiner as a trailing particle); the object phrase
   ends with ``mo``;
4. inflection: plural nouns take the suffix ``-li``; verbs take the tense suffix ``-ta`` (past) or ``-ra``
   (present) and a plural subject adds ``-n`` after it.

Example: ``the big dog saw some small cats today`` -> ``tomu wuna kesh ti pirali lo sa mo gorta``.

The prompt is ``"translate: <english> =>"`` and the target is ``" <velan>"``; the metric is chrF
(sacrebleu) on greedy decoding.
"""

from __future__ import annotations

import numpy as np

NAME = "translation"
METRIC = "chrf"

# (singular, plural, velan stem)
NOUNS = (
    ("dog", "dogs", "wuna"),
    ("cat", "cats", "pira"),
    ("bird", "birds", "sefo"),
    ("fish", "fish", "lamu"),
    ("horse", "horses", "dakel"),
    ("child", "children", "minu"),
    ("teacher", "teachers", "bostar"),
    ("farmer", "farmers", "gelun"),
    ("king", "kings", "raho"),
    ("girl", "girls", "tesi"),
    ("boy", "boys", "kobo"),
    ("friend", "friends", "amel"),
    ("apple", "apples", "zupa"),
    ("book", "books", "lirat"),
    ("house", "houses", "domek"),
    ("river", "rivers", "fluna"),
)
# (english, velan)
ADJECTIVES = (
    ("big", "kesh"),
    ("small", "lo"),
    ("old", "vetu"),
    ("young", "nari"),
    ("red", "rasa"),
    ("green", "vira"),
    ("happy", "hemo"),
    ("quiet", "sulo"),
    ("strong", "buran"),
    ("clever", "idra"),
)
# (base, third person singular, past, velan stem)
VERBS = (
    ("see", "sees", "saw", "gor"),
    ("like", "likes", "liked", "ama"),
    ("find", "finds", "found", "tek"),
    ("help", "helps", "helped", "jusa"),
    ("follow", "follows", "followed", "sek"),
    ("carry", "carries", "carried", "pona"),
    ("watch", "watches", "watched", "wido"),
    ("call", "calls", "called", "kali"),
    ("know", "knows", "knew", "sapi"),
    ("need", "needs", "needed", "nuda"),
    ("paint", "paints", "painted", "kolo"),
    ("hear", "hears", "heard", "odi"),
)
ADVERBS = (("today", "tomu"), ("again", "ripe"), ("often", "mova"), ("quietly", "sulem"), ("now", "nana"))
DETERMINERS = {"the": "ti", "a": "en", "some": "sa"}
OBJECT_MARKER = "mo"
PLURAL_SUFFIX = "li"
TENSE_SUFFIX = {"past": "ta", "present": "ra"}
PLURAL_SUBJECT_SUFFIX = "n"


def _noun_phrase(rng: np.random.Generator) -> tuple[str, str, bool]:
    """Samples a noun phrase; returns (english, velan, plural)."""
    sg, pl, stem = NOUNS[rng.integers(len(NOUNS))]
    plural = bool(rng.random() < 0.35)
    det = ("the", "some")[rng.integers(2)] if plural else ("the", "a")[rng.integers(2)]
    adj = ADJECTIVES[rng.integers(len(ADJECTIVES))] if rng.random() < 0.6 else None
    english = [det] + ([adj[0]] if adj else []) + [pl if plural else sg]
    velan = [stem + (PLURAL_SUFFIX if plural else "")] + ([adj[1]] if adj else []) + [DETERMINERS[det]]
    return " ".join(english), " ".join(velan), plural


def translate_parts(subj, obj, verb, tense, adverb) -> tuple[str, str]:
    """Renders a parsed sentence in English and Velan.

    Args:
      subj, obj: (english, velan, plural) noun phrases from `_noun_phrase`.
      verb: an entry of `VERBS`. tense: "past" or "present". adverb: an entry of `ADVERBS` or None.

    Returns:
      (english, velan) strings.
    """
    base, third, past, stem = verb
    if tense == "past":
        verb_en = past
    else:
        verb_en = base if subj[2] else third
    english = f"{subj[0]} {verb_en} {obj[0]}" + (f" {adverb[0]}" if adverb else "")
    verb_ve = stem + TENSE_SUFFIX[tense] + (PLURAL_SUBJECT_SUFFIX if subj[2] else "")
    velan = " ".join(([adverb[1]] if adverb else []) + [subj[1], obj[1], OBJECT_MARKER, verb_ve])
    return english, velan


def sample(rng: np.random.Generator) -> tuple[str, str]:
    """Samples one example.

    Args:
      rng: numpy generator (host-side data generation).

    Returns:
      (prompt, target): ``"translate: <english> =>"`` and ``" <velan>"``.
    """
    subj = _noun_phrase(rng)
    obj = _noun_phrase(rng)
    verb = VERBS[rng.integers(len(VERBS))]
    tense = ("past", "present")[rng.integers(2)]
    adverb = ADVERBS[rng.integers(len(ADVERBS))] if rng.random() < 0.4 else None
    english, velan = translate_parts(subj, obj, verb, tense, adverb)
    return f"translate: {english} =>", f" {velan}"
