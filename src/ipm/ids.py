"""Semantic memory IDs: `domain_topic_entity`, readable by people and decodable by the model.

An ID is lowercase `[a-z0-9]` words joined by `_`, at least three parts. The engine mints one
from the memory text when the user gives none. Two schemes:

- "salient" (the engine's default, `Config.id_scheme`): a fact about someone ("Caroline attended an LGBTQ support group...")
  becomes `{person}_{rarest word}_{next rarest}` (`caroline_lgbtq_transgender`): the trie's
  first decision is then who the fact is about, and the rest are the words least likely to
  be shared with other facts (rarity from `wordfreq`, English). A first-person memory ("My
  dog's name is Max.") keeps the lexicon's domain and topic, with the most specific entity:
  `personal_pet_max`.
- "lexicon" (this function's default, for compatibility): always domain and topic from a small lexicon of everyday life, and a proper
  noun, else the longest word (`note_caroline_lgbtq`).

Minting is deterministic: same text and same taken IDs give the same ID.
"""

from __future__ import annotations

import re
import unicodedata

from .errors import InvalidID

ID_PATTERN = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+){2,}$")
MAX_ID_LENGTH = 80

# word -> (domain, topic). The first word of the text found here decides both.
LEXICON: dict[str, tuple[str, str]] = {}


def _lex(domain: str, topic: str, words: str) -> None:
    for w in words.split():
        LEXICON.setdefault(w, (domain, topic))


_lex("personal", "pet", "dog dogs puppy pup cat cats kitten pet pets parrot hamster rabbit fish beagle labrador terrier")
_lex("personal", "name", "name nickname called")
_lex("personal", "birthday", "birthday born birth age")
_lex("family", "partner", "wife husband partner spouse girlfriend boyfriend fiance fiancee married wedding anniversary")
_lex("family", "child", "son daughter kid kids children child baby")
_lex("family", "parent", "mom mother dad father parents mum")
_lex("family", "sibling", "sister brother siblings sibling")
_lex("family", "relative", "grandma grandmother grandpa grandfather aunt uncle cousin niece nephew")
_lex("health", "allergy", "allergic allergy allergies")
_lex("health", "medication", "medication medicine pill pills prescription dose mg inhaler insulin")
_lex("health", "doctor", "doctor physician gp dentist dermatologist therapist clinic hospital appointment checkup")
_lex("health", "condition", "asthma diabetes migraine migraines blood pressure cholesterol injury surgery knee back")
_lex("health", "fitness", "run running gym workout yoga marathon swim swimming cycling weight steps")
_lex("health", "diet", "vegetarian vegan gluten lactose diet calories keto")
_lex("work", "job", "job work employer company boss manager colleague coworker office team role position salary promotion")
_lex("work", "project", "project deadline client meeting presentation launch release sprint")
_lex("work", "schedule", "standup shift hours commute")
_lex("finance", "bank", "bank account checking savings mortgage loan credit card debit iban")
_lex("finance", "budget", "budget rent bills subscription spending savings")
_lex("finance", "invest", "stocks shares invest investment portfolio pension retirement 401k crypto bitcoin")
_lex("finance", "tax", "tax taxes accountant")
_lex("home", "address", "address live apartment flat house street moved neighborhood")
_lex("home", "utility", "wifi router internet electricity heating boiler plumber landlord")
_lex("home", "garden", "garden plants plant tomatoes lawn")
_lex("travel", "trip", "trip travel vacation holiday flight flights visit visited visiting hotel airbnb")
_lex("travel", "document", "passport visa license licence")
_lex("transport", "car", "car cars vehicle drive drives bike bicycle motorcycle scooter tesla toyota honda")
_lex("food", "favorite", "favorite favourite love loves")
_lex("food", "cuisine", "food eat eating restaurant pizza sushi coffee tea cook cooking recipe dish cuisine breakfast lunch dinner")
_lex("hobby", "music", "guitar piano music band song songs concert sing violin drums")
_lex("hobby", "reading", "book books read reading novel author")
_lex("hobby", "sport", "football soccer tennis basketball chess climbing hiking ski skiing golf")
_lex("hobby", "media", "movie movies film films show series tv netflix game games gaming")
_lex("hobby", "art", "painting paint drawing photography pottery knitting")
_lex("tech", "device", "laptop phone iphone android computer pc mac macbook tablet ipad monitor keyboard headphones")
_lex("tech", "software", "editor ide vim emacs vscode language python rust javascript linux windows software app password")
_lex("personal", "gear", "chair desk")
_lex("education", "school", "school university college degree studied study course class teacher")

STOPWORDS = frozenset(
    """a an the and or but if then so of to in on at by for with from about as into over after before
    is are was were be been being am do does did have has had having i me my mine myself we our us you
    your he she it its they them their his her this that these those there here what which who whom
    when where why how not no yes can could will would should may might must just very really also too
    up down out off again once all any both each few more most other some such only own same than s t
    im i'm ive i've dont don't its it's thats that's name named got get gets every usually always""".split()
)


def validate_id(memory_id: str) -> str:
    """Return the ID if it is well formed, else raise InvalidID saying what is wrong."""
    if not isinstance(memory_id, str) or not memory_id:
        raise InvalidID("memory ID must be a non-empty string like 'personal_pet_max'")
    if len(memory_id) > MAX_ID_LENGTH:
        raise InvalidID(f"memory ID {memory_id[:40]!r}... is longer than {MAX_ID_LENGTH} characters")
    if not ID_PATTERN.fullmatch(memory_id):
        raise InvalidID(
            f"memory ID {memory_id!r} is malformed: use lowercase letters and digits in at least "
            "three parts joined by '_', like 'personal_pet_max' (domain_topic_entity)"
        )
    return memory_id


def slug(text: str) -> str:
    """ASCII-fold and lowercase a word; keep [a-z0-9] only. A word with no Latin letter or digit
    ("собака", "東京") is transliterated instead (anyascii: "sobaka", "dongjing"), so a memory in
    another script gets a readable ID too. (Only then: a Latin word keeps its fold, "Tromsø" ->
    "troms", as the IDs minted so far have it.)"""
    folded = re.sub(r"[^a-z0-9]+", "", unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower())
    if not folded and any(ch.isalnum() for ch in text):
        from anyascii import anyascii

        folded = re.sub(r"[^a-z0-9]+", "", anyascii(text).lower())
    return folded


def words_of(text: str) -> list[str]:
    return re.findall(r"[\w'’]+", text, flags=re.UNICODE)


def _entity(text: str, topic_word: str | None) -> str:
    tokens = words_of(text)
    proper = _proper_nouns(text)
    if proper:
        return "_".join(proper[:2])
    content = [slug(t.split("'")[0].split("’")[0]) for t in tokens]
    content = [w for w in content if w and w not in STOPWORDS and w != topic_word and len(w) > 2]
    content = [w for w in content if w not in LEXICON] or content
    if content:
        return max(content, key=len)  # longest word: usually the most specific
    numbers = [slug(t) for t in tokens if any(c.isdigit() for c in t)]
    return numbers[0] if numbers else "note"


ID_SCHEMES = ("salient", "lexicon")
FIRST_PERSON = frozenset("i me my mine myself we us our ours i'm i've i'd i'll".split())
NAME_MAX_ZIPF = 4.3  # a capitalised first word rarer than this is taken for a name ("Caroline" 4.0, "Painting" 4.6)
# Lexicon words too vague to name a fact's domain outside first-person memories.
VAGUE = frozenset("love loves favorite favourite work name called live".split())


def _zipf(word: str) -> float:
    from wordfreq import zipf_frequency

    return zipf_frequency(word, "en")


def _subject(text: str) -> str | None:
    """Who a third-person fact is about: a capitalised, rare-enough first word, else the first
    proper noun inside a sentence."""
    words = words_of(text)
    if words:
        first = words[0].split("'")[0].split("’")[0]
        w = slug(first)
        if first[:1].isupper() and w and w not in STOPWORDS and len(w) > 1 and _zipf(w) < NAME_MAX_ZIPF:
            return w
    proper = _proper_nouns(text)
    return proper[0] if proper else None


def _proper_nouns(text: str) -> list[str]:
    """Capitalised words that do not start a sentence."""
    sentence_start = True
    proper: list[str] = []
    for raw in re.findall(r"[\w'’]+|[.!?]", text):
        if raw in ".!?":
            sentence_start = True
            continue
        word = raw.split("'")[0].split("’")[0]
        if word[:1].isupper() and not sentence_start and slug(word) and slug(word) not in STOPWORDS:
            proper.append(slug(word))
        sentence_start = False
    return proper


def _rarest(text: str, n: int, exclude: set[str]) -> list[str]:
    """The n content words of the text rarest in English, in order of rarity."""
    words = [slug(t.split("'")[0].split("’")[0]) for t in words_of(text)]
    words = list(dict.fromkeys(w for w in words if w and len(w) > 2 and w not in STOPWORDS and w not in exclude
                               and not w.isdigit()))
    return sorted(words, key=lambda w: (_zipf(w), words.index(w)))[:n]


def _unique(base: str, taken: set[str] | frozenset[str]) -> str:
    candidate, n = base, 2
    while candidate in taken:
        candidate = f"{base}_{n}"
        n += 1
    return candidate


def topic_prefixed_ids(texts: list[str], clusters: list[int]) -> list[str]:
    """IDs `{topic}_{person}_{rarest word}` for memories grouped into topic clusters (by any
    clustering, one label per text): the topic is the cluster's most distinctive content word
    (frequent in it, found in few other clusters; names left out), so an ID's first token says
    what the fact is about. Deterministic; unique among themselves. The benchmarks compare this
    scheme with the minted ones (`benchmarks/locomo.py --ids cluster`)."""
    import math
    from collections import Counter

    subjects = [_subject(t) for t in texts]
    names = {s for s in subjects if s}
    words = [set(_rarest(t, 1000, names)) for t in texts]  # content words, names left out
    members: dict[int, list[set[str]]] = {}
    for ws, c in zip(words, clusters):
        members.setdefault(c, []).append(ws)
    spread = Counter(w for group in members.values() for w in set().union(*group))
    label = {}
    for c, group in members.items():
        counts = Counter(w for ws in group for w in ws)
        label[c] = max(counts, key=lambda w: (counts[w] * math.log(1 + len(members) / spread[w]), -_zipf(w), w),
                       default="misc")
    taken: set[str] = set()
    out = []
    for text, c, subject in zip(texts, clusters, subjects):
        parts = ([label[c]] + ([subject] if subject else []) + _rarest(text, 2, {label[c], subject}))[:3]
        base = "_".join(parts + ["note"] * (3 - len(parts)))[:MAX_ID_LENGTH - 4].strip("_")
        out.append(_unique(validate_id(base), taken))
        taken.add(out[-1])
    return out


def mint_id(text: str, taken: set[str] | frozenset[str] = frozenset(), scheme: str = "lexicon") -> str:
    """Make a readable, unique ID for a memory text (see the module docstring for the schemes)."""
    if scheme not in ID_SCHEMES:
        raise InvalidID(f"unknown ID scheme {scheme!r}; choose from {', '.join(ID_SCHEMES)}")
    if scheme == "salient":
        lowered = {slug(w) for w in words_of(text.lower())} | {w.lower() for w in words_of(text)}
        subject = None if lowered & FIRST_PERSON else _subject(text)
        if subject is not None:
            parts = [subject] + _rarest(text, 2, {subject})
            if len(parts) < 3:
                parts.append("note")
            base = "_".join(parts)[:MAX_ID_LENGTH - 4].strip("_")
            if ID_PATTERN.fullmatch(base):
                return _unique(base, taken)
        tokens = [slug(t.split("'")[0].split("’")[0]) for t in words_of(text)]
        hit = next((w for w in tokens if w in LEXICON and (subject is None or w not in VAGUE)), None)
        domain, topic = LEXICON[hit] if hit else ("note", None)
        proper = _proper_nouns(text)
        entity = proper[0] if proper else next(iter(_rarest(text, 1, {hit} if hit else set())), "note")
        topic = topic or next(iter(_rarest(text, 1, {entity})), "misc")
        base = "_".join((domain, topic, entity))[:MAX_ID_LENGTH - 4].strip("_")
        return _unique(base if ID_PATTERN.fullmatch(base) else f"{domain}_misc_note", taken)
    tokens = [slug(t.split("'")[0].split("’")[0]) for t in words_of(text)]
    domain, topic, topic_word = "note", None, None
    for w in tokens:
        if w in LEXICON:
            domain, topic = LEXICON[w]
            topic_word = w
            break
    if topic is None:
        content = [w for w in tokens if w and w not in STOPWORDS and len(w) > 2]
        topic = content[0] if content else "misc"
        topic_word = topic
    entity = _entity(text, topic_word)
    base = "_".join(p for p in (domain, topic, entity) if p)[:MAX_ID_LENGTH - 4].strip("_")
    if not ID_PATTERN.fullmatch(base):
        base = f"{domain}_{topic or 'misc'}_note"
    return _unique(base, taken)
