"""Training questions: what a person might ask whose answer is a given memory.

The adapter learns question -> ID, so the questions it trains on decide what it can answer.
Three sources, mixed:
- the memory's own text, and any questions the user gave for it;
- the built-in generator (fast, deterministic): template questions about the entities and
  phrases the memory names, with everyday synonyms swapped in, plus pseudo-queries (keyword
  subsets and spans of the text, the words of the ID);
- optionally the base instruct model, prompted with examples, writing questions in batches;
  its output is filtered (must name something in the memory, no "this fact", no duplicates).
"""

from __future__ import annotations

import functools
import random
import re
from typing import Callable, Iterable

from .errors import InvalidInput
from .ids import STOPWORDS

# Everyday synonyms: a question rarely uses the memory's own word.
SYNONYMS: dict[str, list[str]] = {}


def _syn(*groups: str) -> None:
    for group in groups:
        words = group.split(",")
        for w in words:
            SYNONYMS.setdefault(w.strip(), []).extend(x.strip() for x in words if x.strip() != w.strip())


_syn("dog,pup,puppy,pet,doggo", "cat,kitty,pet,kitten", "car,vehicle,ride,auto", "bike,bicycle",
     "wife,spouse,partner", "husband,spouse,partner", "girlfriend,partner", "boyfriend,partner",
     "mom,mother,mum", "dad,father", "son,kid,boy,child", "daughter,kid,girl,child", "kids,children",
     "sister,sibling", "brother,sibling", "grandma,grandmother", "grandpa,grandfather",
     "doctor,physician,gp,doc", "dentist,dental", "medication,medicine,meds,pills,prescription",
     "allergic,allergy,reaction", "job,work,employer,company,position", "boss,manager,supervisor",
     "colleague,coworker,teammate", "salary,pay,income,earn", "house,home,place", "apartment,flat,place,home",
     "address,live", "phone,mobile,cell", "laptop,computer,notebook", "password,login,code,pin",
     "birthday,born,bday", "anniversary,wedding", "trip,vacation,holiday,travel", "flight,plane,fly",
     "passport,travel document", "favorite,favourite,love,best,prefer", "food,meal,eat,dish",
     "restaurant,place to eat", "coffee,espresso,latte", "book,novel,read", "movie,film",
     "show,series", "song,track,music", "gym,workout,exercise", "run,running,jog", "money,cash,funds",
     "bank,account", "mortgage,home loan", "rent,monthly payment", "school,class,course", "teacher,tutor",
     "friend,buddy,pal", "neighbor,neighbour", "appointment,visit,booking", "meeting,call",
     "birthday party,party", "guitar,instrument", "piano,instrument", "plants,garden",
     "blood pressure,bp", "weight,weigh", "height,tall", "age,old", "city,town", "country,nation")

TEMPLATES_NOUN = [
    "What is my {n}?", "What's my {n}?", "Tell me about my {n}.", "What do you know about my {n}?",
    "Do you remember my {n}?", "Remind me about my {n}.", "What did I tell you about my {n}?",
    "Anything about my {n}?", "my {n}?", "Which {n} do I have?", "Who is my {n}?", "Where is my {n}?",
    "When is my {n}?", "What about my {n}?", "What was my {n} again?", "Any info on my {n}?",
]
TEMPLATES_ENTITY = [
    "Who is {e}?", "What about {e}?", "Tell me about {e}.", "What do I know about {e}?",
    "What did I say about {e}?", "{e}?", "Remind me what I said about {e}.", "Anything on {e}?",
]
TEMPLATES_TOPIC = [
    "What about my {t}?", "Anything about my {t}?", "Tell me about my {t}.", "What do you know about my {t}?",
    "My {t}?", "What's the deal with my {t}?",
]
PAIR_TEMPLATES = ["{e} {n}", "What about {e} and my {n}?", "{e}'s {n}?", "my {n} {e}", "Tell me about {e} ({n}).",
                  "What do I know about {e} and the {n}?"]
KEYWORD_FRAMES = ["What about {k}?", "Do you remember {k}?", "Anything about {k}?", "{k}?", "What did I say about {k}?",
                  "Remind me: {k}"]
BAD_QUESTION = re.compile(r"\b(this|the|that|above|given) (fact|statement|sentence|text|memory|passage)\b", re.I)
WORD = re.compile(r"[\w'’-]+", re.UNICODE)


def content_words(text: str) -> list[str]:
    """The text's words that say something (lowercased; stop words, one-letter words and
    possessives' endings dropped), in any script: "собака" is a content word too."""
    out = []
    for raw in WORD.findall(text):
        w = raw.lower().split("'")[0].split("’")[0].strip("-")
        if any(ch.isalnum() for ch in w) and w not in STOPWORDS and len(w) > 1:
            out.append(w)
    return out


def my_phrases(text: str) -> list[str]:
    """Noun phrases the user owns: the words after 'my' / 'our' up to a stop word."""
    words = WORD.findall(text)
    out = []
    for i, w in enumerate(words):
        if w.lower() in ("my", "our"):
            phrase = []
            for nxt in words[i + 1:i + 4]:
                low = nxt.lower()
                if low in STOPWORDS or low.endswith("'s") and phrase:
                    if low.endswith("'s"):
                        phrase.append(low[:-2])
                    break
                phrase.append(low.removesuffix("'s").removesuffix("’s"))
                if nxt.endswith(("'s", "’s")):
                    break
            if phrase:
                out.append(" ".join(phrase))
    return list(dict.fromkeys(out))


def entities(text: str) -> list[str]:
    """Proper nouns (capitalised words not starting a sentence, joined when adjacent) and numbers."""
    out, run, start = [], [], True
    for raw in re.findall(r"[\w'’-]+|[.!?;:,]", text):
        if raw in ".!?;:,":
            if run:
                out.append(" ".join(run))
                run = []
            start = raw in ".!?"
            continue
        word = raw.removesuffix("'s").removesuffix("’s")
        if (word[:1].isupper() and not start and word.lower() not in STOPWORDS) or any(c.isdigit() for c in word):
            run.append(word)
        elif run:
            out.append(" ".join(run))
            run = []
        start = False
    if run:
        out.append(" ".join(run))
    return list(dict.fromkeys(out))


# Statement -> wh-questions ("Jon visited Paris recently" -> "Where did Jon visit?"). Without a
# parser: the subject is what precedes the first word that reads as a verb.
AUXILIARIES = {"is", "was", "are", "were", "am", "has", "have", "had", "will", "can", "could", "would", "should",
               "does", "did", "do", "may", "might", "must"}
IRREGULAR_PAST = dict(pair.split(":") for pair in (
    "went:go had:have made:make took:take got:get saw:see found:find felt:feel gave:give bought:buy "
    "brought:bring thought:think told:tell said:say met:meet left:leave kept:keep began:begin came:come "
    "did:do knew:know ran:run wrote:write won:win lost:lose spent:spend sent:send built:build taught:teach "
    "caught:catch drew:draw drove:drive ate:eat fell:fall heard:hear held:hold led:lead paid:pay sold:sell "
    "sang:sing sat:sit slept:sleep spoke:speak stood:stand swam:swim threw:throw understood:understand "
    "wore:wear chose:choose became:become grew:grow forgot:forget rode:ride broke:break hung:hang "
    "fought:fight flew:fly hid:hide shot:shoot struck:strike woke:wake").split())
CLAUSE_END = {"and", "but", "because", "due", "despite", "which", "who", "while", "after", "before", "since",
              "so", "as", "where", "when", "that", "with", "for", "to", "in", "at", "on", "from", "of"}
WH_PAST = ["What did {s} {v}?", "When did {s} {v} {o}?", "Why did {s} {v} {o}?", "Where did {s} {v} {o}?",
           "Who {past} {o}?", "How did {s} {v} {o}?", "Did {s} {v} {o}?"]
WH_PRESENT = ["What does {s} {v}?", "Why does {s} {v} {o}?", "Who {pres} {o}?", "How does {s} {v} {o}?",
              "Does {s} {v} {o}?"]
WH_AUX = ["What {a} {s} {o1}?", "Why {a} {s} {o}?", "Who {a} {o}?", "When {a} {s} {o}?", "{A} {s} {o}?"]
WH_COPULA = ["What {a} {s}?", "Who {a} {o}?", "{A} {s} {o}?"]


def _zipf(word: str) -> float:
    from wordfreq import zipf_frequency

    return zipf_frequency(word, "en")


def verb_base(word: str) -> tuple[str, str] | None:
    """(base form, "past" or "present") if `word` reads as an inflected verb, else None."""
    w = word.lower()
    if w in IRREGULAR_PAST:
        return IRREGULAR_PAST[w], "past"
    if len(w) > 4 and w.endswith("ied"):
        return w[:-3] + "y", "past"
    if len(w) > 4 and w.endswith("ed"):
        stem = w[:-2]
        options = [stem, stem + "e"] + ([stem[:-1]] if stem[-1] == stem[-2] and stem[-1] not in "lsfz" else [])
        return max(options, key=_zipf), "past"
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y", "present"
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is", "'s", "’s")):
        base = w[:-2] if w.endswith(("ches", "shes", "xes", "oes", "sses")) else w[:-1]
        return base, "present"
    return None


def wh_questions(text: str) -> list[str]:
    """Who / what / when / why questions made from each sentence's subject and verb."""
    out = []
    for sentence in re.split(r"(?<=[.!?;])\s+", text):
        words = WORD.findall(sentence)
        for v in range(1, min(6, len(words))):
            w = words[v].lower()
            named_subject = words[0].lower() not in STOPWORDS and all(x[:1].isupper() or x.lower() == "and"
                                                                      for x in words[:v])
            if w in AUXILIARIES or w in IRREGULAR_PAST or w.endswith("ed") or (named_subject and verb_base(w)):
                break
        else:
            continue
        subject = " ".join(words[:v])
        if subject.split()[0].lower() in ("my", "our", "we", "he", "she", "they", "it", "his", "her", "their"):
            subject = subject[0].lower() + subject[1:]
        rest = []
        for x in words[v + 1:v + 8]:
            if x.lower() in CLAUSE_END and rest:
                break
            rest.append(x)
        obj = " ".join(rest)
        if w in AUXILIARIES:
            if w in ("has", "have", "had") and not (rest and rest[0].endswith(("ed", "en"))):
                base, tense = "have", ("past" if w == "had" else "present")
            else:
                templates = WH_AUX if rest and rest[0].endswith("ing") else WH_COPULA
                out += [t.format(a=w, A=w.capitalize(), s=subject, o=obj, o1=rest[0] if rest else "").replace(" ?", "?")
                        for t in templates]
                continue
        else:
            found = verb_base(w)
            if found is None:
                continue
            base, tense = found
        templates = WH_PAST if tense == "past" else WH_PRESENT
        out += [t.format(s=subject, v=base, past=words[v], pres=words[v], o=obj).replace(" ?", "?") for t in templates]
    return dedupe(q[0].upper() + q[1:] for q in out)


def synonyms_of(phrase: str) -> list[str]:
    words = phrase.split()
    out = []
    for i, w in enumerate(words):
        for s in SYNONYMS.get(w, []):
            out.append(" ".join(words[:i] + [s] + words[i + 1:]))
    return out


NOT_SWAPPED = set(
    "january february march april may june july august september october november december "
    "monday tuesday wednesday thursday friday saturday sunday one two three four five six seven eight nine ten "
    "eleven twelve twenty thirty forty fifty hundred thousand first second third fourth fifth last next".split())


class RelatedWords:
    """Words near a memory's words in MiniLM's embedding space ("mortgage" -> loan, lending;
    "counseling" -> therapy), for the `related` question kind: people ask about a memory in
    their own words, and a hand-made synonym list cannot cover every memory's vocabulary.

    The vocabulary is the dense encoder's whole-word tokens (about 21k); their embeddings are
    computed once per machine and cached in `cache_dir`."""

    def __init__(self, encoder, cache_dir, k: int = 6, min_cosine: float = 0.6):
        import hashlib
        import os
        from pathlib import Path

        import numpy as np

        vocab = encoder.model.tokenizer.get_vocab()
        self.words = sorted(w for w in vocab if re.fullmatch(r"[a-z]{3,}", w) and w not in STOPWORDS)
        if not self.words:
            raise InvalidInput("the dense model's tokenizer has no whole-word vocabulary for the related question kind")
        # Keyed by the words and the encoder (its fingerprint), so another model is not served stale vectors.
        key = "\n".join([getattr(encoder, "fingerprint", ""), *self.words])
        path = Path(cache_dir) / f"related-words-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npy"
        emb = None
        if path.is_file():
            try:
                emb = np.load(path)
            except (OSError, ValueError):
                emb = None  # unreadable (cut short): computed again below
        if emb is None or emb.shape[0] != len(self.words):
            emb = encoder.encode(self.words).cpu().numpy().astype(np.float16)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")  # processes building it at once
            np.save(tmp, emb)
            tmp.replace(path)
        self.emb = emb.astype(np.float32)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.encoder, self.k, self.min_cosine = encoder, k, min_cosine
        self._memo: dict[str, list[str]] = {}

    def __call__(self, word: str) -> list[str]:
        """Up to k words near `word`, nearest first, without its inflections ("dogs" for "dog")."""
        import numpy as np

        word = word.lower()
        if word not in self._memo:
            i = self.index.get(word)
            v = self.emb[i] if i is not None else self.encoder.encode([word]).cpu().numpy()[0]
            sims = self.emb @ v
            out = []
            for j in np.argsort(-sims)[: 4 * self.k]:
                w = self.words[j]
                if sims[j] < self.min_cosine or len(out) == self.k:
                    break
                if not _same_stem(w, word):
                    out.append(w)
            self._memo[word] = out
        return self._memo[word]


@functools.lru_cache(maxsize=2)
def related_words(encoder, cache_dir) -> RelatedWords:
    """The `RelatedWords` of an encoder, built once per process: a serving process that trains
    again reuses its ~16 MB of vectors and what it has looked up."""
    return RelatedWords(encoder, cache_dir)


def _same_stem(a: str, b: str) -> bool:
    n = min(4, len(a), len(b))
    return a[:n] == b[:n]


# Who a name is: people and pets are introduced once by their relation to the user ("My wife
# Priya is a nurse") and later named without it ("Priya's car is a Prius"), while questions
# use either ("What does my wife drive?"). Only these relations, with these words before them,
# make an alias: a looser pattern would read "my birthday is July" or "my trip with my sister
# Anna" as one.
RELATIONS = (
    "wife husband spouse partner fiance fiancé fiancee fiancée girlfriend boyfriend son daughter kid child baby "
    "stepson stepdaughter mom mother mum dad father stepmom stepmother stepdad stepfather sister brother sibling "
    "twin grandma grandmother grandpa grandfather grandson granddaughter aunt uncle cousin niece nephew "
    "friend roommate flatmate neighbor neighbour boss manager supervisor coworker colleague mentor therapist "
    "doctor dentist vet trainer coach teacher tutor landlord assistant dog cat pet puppy kitten").split()
RELATION_MODIFIERS = (
    "older younger elder oldest youngest eldest big little baby best closest close old new former ex step twin "
    "next-door work primary care family childhood college school favorite favourite").split()
# Capitalised words that follow "my manager is" without being a name.
NOT_NAMES = set(
    "i american british english german french spanish italian polish chinese japanese korean indian mexican "
    "canadian irish scottish welsh russian ukrainian dutch swedish norwegian danish finnish greek turkish "
    "brazilian portuguese australian african asian european latina latino jewish christian catholic muslim "
    "hindu buddhist protestant mormon vegan vegetarian".split())
TITLE = r"(?:(?:Dr|Mrs|Mr|Ms|Mx|Prof)\.?\s+)"
_ALIAS = re.compile(
    r"\b(?P<det>[Mm]y|[Oo]ur)\s+(?P<mods>(?:(?:" + "|".join(map(re.escape, RELATION_MODIFIERS)) + r")\s+){0,2})"
    r"(?P<rel>" + "|".join(RELATIONS) + r")\b(?P<link>['’]s name is|,? is called|,? named|\s+is|,)?"
    r"\s+" + TITLE + r"?(?P<name>[^\W\d_][\w’'-]*(?:\s+[^\W\d_][\w’'-]*)?)(?P<after>\s*[,.;:!?)]|\s*$)?")
POSSESSIVE = re.compile(r"['’]s?$")


def _alias_name(m: re.Match) -> str | None:
    """The name an _ALIAS match introduces, or None: capitalised, its possessive dropped (a
    possessive ends it: "Rebecca's Tesla"), not a nationality or the like; after a bare comma
    ("like my dad, Sarah loves ..."), only an apposition ("my wife, Priya, ...")."""
    words = m["name"].split()
    if m["link"] == "," and (len(words) > 1 or m["after"] is None):
        return None
    name = []
    for w in words:
        bare = POSSESSIVE.sub("", w)
        low = bare.lower()
        if not bare[:1].isupper() or low in NOT_NAMES or low in STOPWORDS or low in NOT_SWAPPED:
            break
        name.append(bare)
        if bare != w:
            break
    return " ".join(name) or None


class Aliases:
    """Names and the relations that introduce them, read from all of a namespace's memories
    ("My wife Priya ..." gives Priya <-> my wife), for the `aliases` question kind: a memory's
    questions that name Priya are asked again about "my wife", and those about "my wife" again
    about Priya, so the index learns who is who across memories, which no single memory's text
    tells a retriever. A name given two relations is left out; a relation given two names
    ("my friend" Anna and Tom) is asked about under each name, never swapped back to one."""

    def __init__(self, texts: Iterable[str]):
        by_name: dict[str, set[str]] = {}
        by_relation: dict[str, set[str]] = {}
        phrase: dict[str, str] = {}  # relation ("son") -> as first written ("our son")
        for text in texts:
            # every "my" starts its own try: a failed one may run over the next ("my wife and my son Leo")
            for start in re.finditer(r"\b(?:[Mm]y|[Oo]ur)\b", text):
                m = _ALIAS.match(text, start.start())
                name = m and _alias_name(m)
                if name is None:
                    continue
                relation = " ".join([*m["mods"].split(), m["rel"]])  # "my son" and "our son" are one
                phrase.setdefault(relation, f"{m['det'].lower()} {relation}")
                by_name.setdefault(name, set()).add(relation)
                by_relation.setdefault(relation, set()).add(name)
        self.phrase_of = {n: phrase[next(iter(r))] for n, r in by_name.items() if len(r) == 1}
        self.name_of = {phrase[r]: next(iter(n)) for r, n in by_relation.items()
                        if len(n) == 1 and next(iter(n)) in self.phrase_of}
        # a full name also goes by its first word ("Rebecca Lindqvist" -> Rebecca), if no one else does
        for name, p in list(self.phrase_of.items()):
            first = name.split()[0]
            if first != name and not any(o != name and o.split()[0] == first for o in by_name):
                self.phrase_of[first] = p
        self._names = {n: re.compile(r"(?<![\w-])" + TITLE + r"?" + re.escape(n) + r"(?![\w-])(?P<next>\s+\S)?")
                       for n in self.phrase_of}
        # "my son" and "our son" are the same person
        self._phrases = {p: re.compile(r"(?<![\w-])(?:my|our)" + re.escape(p[p.index(" "):]) + r"(?![\w-])", re.I)
                         for p in set(self.phrase_of.values())}
        # alias_questions asks about every question of one memory in turn: read its text once
        self._spelled_out = functools.lru_cache(maxsize=16)(self._spelled_out_uncached)

    def __len__(self) -> int:
        return len(self.phrase_of)

    def variants(self, question: str, text: str = "") -> list[str]:
        """The question with each aliased name swapped for its relation, and each relation for
        its name ("Priya's car?" -> "my wife's car?"; "my wife's job?" -> "Priya's job?"); none
        for an alias the memory's `text` itself spells out ("My wife Priya ...")."""
        out = []
        spelled_out = self._spelled_out(text)
        for name, phrase in self.phrase_of.items():
            if name in spelled_out:
                continue  # the memory says who is who
            names, phrases = self._names[name], self._phrases[phrase]
            has_name, has_phrase = _found(names, question), phrases.search(question)
            if has_name and has_phrase:
                continue
            if has_name:
                out.append(_capitalised(names.sub(lambda m: _keep_next(m, phrase), question), question))
            elif has_phrase and self.name_of.get(phrase) == name:
                out.append(_capitalised(phrases.sub(name, question), question))
        return dedupe(out)

    def _spelled_out_uncached(self, text: str) -> frozenset[str]:
        """The names whose relation `text` gives too (both spelled out: "My wife Priya ...")."""
        return frozenset(name for name, phrase in self.phrase_of.items()
                         if _found(self._names[name], text) and self._phrases[phrase].search(text))


def _found(pattern: re.Pattern, s: str) -> bool:
    """A name matched alone, not as the first word of a longer name ("Rebecca" in "Rebecca Lindqvist")."""
    return any(not _joined(m) for m in pattern.finditer(s))


def _joined(m: re.Match) -> bool:
    return bool(m["next"]) and m["next"].strip()[:1].isupper()


def _keep_next(m: re.Match, phrase: str) -> str:
    return m[0] if _joined(m) else phrase + (m["next"] or "")


def _capitalised(variant: str, original: str) -> str:
    """Keep the original's capital first letter ("Priya is ..." -> "My wife is ...")."""
    return variant[0].upper() + variant[1:] if original[:1].isupper() and variant else variant


ALIAS_VARIANTS = 4  # alias variants added per memory (the text's first, then sampled questions)


def alias_questions(memory_id: str, text: str, questions: Iterable[str], aliases: Aliases, seed: int = 0) -> list[str]:
    """Up to ALIAS_VARIANTS of a memory's inputs (`questions`, its text first) asked again with
    a name swapped for its relation or the other way round (Aliases.variants): the first
    variant, then a sample; deterministic for (id, inputs, seed), drawn apart from the memory's
    other questions so it leaves them as they are."""
    questions = list(questions)
    have = {_dedupe_key(q) for q in questions}
    found = [v for v in dedupe(v for q in questions for v in aliases.variants(q, text)) if _dedupe_key(v) not in have]
    if not found:
        return []
    rng = random.Random(f"{seed}:{memory_id}:aliases")
    return [found[0]] + rng.sample(found[1:], min(len(found) - 1, ALIAS_VARIANTS - 1))


QUESTION_KINDS = ("templates", "wh", "keywords", "spans", "id", "related", "aliases")
DEFAULT_QUESTION_KINDS = ("templates", "wh", "keywords", "spans", "id")  # Config.question_kinds' default


def builtin_questions(memory_id: str, text: str, n: int, seed: int = 0,
                      kinds: Iterable[str] = DEFAULT_QUESTION_KINDS,
                      related: Callable[[str], list[str]] | None = None,
                      aliases: Aliases | None = None) -> list[str]:
    """About `n` distinct training inputs for one memory (the text itself first), deterministic
    for (id, text, seed). `kinds` picks the sources, drawn from in turn:
    templates: questions about the phrases after "my", the proper nouns and the ID's topic;
    wh: who/what/when/why questions from each sentence's subject and verb;
    keywords: subsets of the content words, sometimes with a synonym, bare or in a frame;
    spans: the sentences and short word spans of the text (doc-as-query);
    id: the words of the ID;
    related: keyword subsets with words swapped for `related(word)` (a RelatedWords), bare or
    in a frame: the memory asked about in other words;
    aliases: up to ALIAS_VARIANTS of the inputs above again, a name swapped for the relation
    other memories give it or the other way round (see Aliases), on top of the `n`."""
    rng = random.Random(f"{seed}:{memory_id}")
    parts = memory_id.split("_")
    kinds = set(kinds)
    pools: list[list[str]] = []
    if "templates" in kinds:
        topic_words = [p for p in parts[1:2] if p not in STOPWORDS]
        nouns = my_phrases(text)
        nouns += [s for p in nouns for s in synonyms_of(p)]
        nouns += [t for t in topic_words if t not in nouns]
        ents = entities(text)
        pools.append([TEMPLATES_NOUN[i].format(n=noun) for noun in nouns for i in rng.sample(range(len(TEMPLATES_NOUN)), 4)])
        pools.append([TEMPLATES_ENTITY[i].format(e=e) for e in ents for i in rng.sample(range(len(TEMPLATES_ENTITY)), 4)])
        # An entity together with what the memory says about it ("Hannah birthday", "Max's breed?").
        pools.append([rng.choice(PAIR_TEMPLATES).format(e=e, n=noun) for e in ents for noun in nouns + topic_words])
        pools.append([t.format(t=topic) for topic in topic_words for t in rng.sample(TEMPLATES_TOPIC, 2)])
    if "wh" in kinds:
        pools.append(wh_questions(text))
    if "keywords" in kinds:
        words = content_words(text)
        syn_words = [s for w in words for s in SYNONYMS.get(w, [])]
        kw = []
        for _ in range(10):
            if len(words) >= 2:
                k = rng.randint(2, min(4, len(words)))
                idx = sorted(rng.sample(range(len(words)), k))
                picked = [words[i] for i in idx]
                if syn_words and rng.random() < 0.5:
                    j = rng.randrange(len(picked))
                    alts = SYNONYMS.get(picked[j])
                    if alts:
                        picked[j] = rng.choice(alts)
                kw.append(_keyword_query(picked, rng))
        pools.append(kw)
    if "spans" in kinds:
        sentences = [x.strip() for x in re.split(r"(?<=[.!?;])\s+", text) if len(x.split()) >= 3]
        pools.append(sentences if len(sentences) > 1 else [])
        tokens = text.split()
        spans = []
        for _ in range(4):
            if len(tokens) > 5:
                length = rng.randint(3, min(8, len(tokens) - 1))
                start = rng.randrange(0, len(tokens) - length + 1)
                spans.append(" ".join(tokens[start:start + length]))
        pools.append(spans)
    if "id" in kinds:
        pools.append([" ".join(parts[1:]), " ".join(parts)])
    if "related" in kinds:
        if related is None:
            raise InvalidInput("the related question kind needs a `related` word source (RelatedWords)")
        words = list(dict.fromkeys(content_words(text)))
        # Only common words are swapped: a name, number or date swapped for a near one
        # ("Samuel" -> David, "July" -> September) would name a different fact. A word is
        # common if it is written in lower case somewhere in the text (a capitalised word
        # starting a sentence may be a name: it is kept).
        lower = set(content_words(" ".join(raw for raw in WORD.findall(text) if raw.islower())))
        near = {w: [x for x in related(w) if x not in NOT_SWAPPED] for w in words
                if w in lower and w not in NOT_SWAPPED and not any(c.isdigit() for c in w)}
        swappable = [w for w in words if near.get(w)]
        rel = []
        for _ in range(10 if swappable else 0):
            k = rng.randint(min(2, len(words)), min(3, len(words)))
            picked = rng.sample(words, k)
            if not any(w in swappable for w in picked):
                picked[rng.randrange(k)] = rng.choice(swappable)
            # Each word with neighbours is swapped for one (at least one word is): other words.
            swapped = [rng.choice(near[w]) if near.get(w) and rng.random() < 0.7 else w for w in picked]
            if swapped == picked:
                j = next(i for i, w in enumerate(picked) if near.get(w))
                swapped[j] = rng.choice(near[picked[j]])
            rel.append(_keyword_query(swapped, rng))
        pools.append(rel)

    out: list[str] = [text]
    # Round-robin over the pools so every kind is represented even when n is small.
    for pool in pools:
        rng.shuffle(pool)
    while len(out) < n and any(pools):
        for pool in pools:
            if pool and len(out) < n:
                out.append(pool.pop())
    if "aliases" in kinds:
        if aliases is None:
            raise InvalidInput("the aliases question kind needs the namespace's Aliases")
        out += alias_questions(memory_id, text, out, aliases, seed)
    return dedupe(out)


def _keyword_query(words: list[str], rng: random.Random) -> str:
    """Keywords as a query: bare ("dog breed") or in a frame ("Anything about dog breed?")."""
    phrase = " ".join(words)
    return rng.choice(KEYWORD_FRAMES).format(k=phrase) if rng.random() < 0.5 else phrase


def _dedupe_key(question: str) -> str:
    """Questions differing only in case, spacing or end punctuation are the same question."""
    return " ".join(question.lower().split()).strip(" ?.!")


def dedupe(questions: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for q in questions:
        key = _dedupe_key(q)
        if key and key not in seen:
            seen.add(key)
            out.append(" ".join(q.split()))
    return out


def keep_generated(question: str, text: str) -> bool:
    """Filter for model-written questions: a question, naming something the memory names."""
    q = question.strip()
    if not (3 <= len(q.split()) <= 30) or BAD_QUESTION.search(q):
        return False
    mem = set(content_words(text)) | {s for w in content_words(text) for s in SYNONYMS.get(w, [])}
    return bool(mem & set(content_words(q)))


FEW_SHOT = [
    ("My dog's name is Max and he is a beagle.",
     ["What is my dog called?", "What breed is Max?", "What's the name of my pet?"]),
    ("I'm allergic to penicillin.",
     ["Which antibiotic can't I take?", "Do I have any drug allergies?", "What medicine am I allergic to?"]),
    ("My sister Anna lives in Berlin.",
     ["Where does Anna live?", "Which city is my sister in?", "Who is Anna?"]),
]


def llm_prompt(text: str, n: int) -> str:
    shots = "\n\n".join(f"Fact: {fact}\nQuestions:\n" + "\n".join(f"- {q}" for q in qs) for fact, qs in FEW_SHOT)
    return (f"Write {n} short questions a person would ask to recall the fact. Each question must mention "
            f"something specific from the fact.\n\n{shots}\n\nFact: {text}\nQuestions:\n-")


def llm_questions(base, memories: list[tuple[str, str]], n: int, seed: int = 0, batch_size: int = 16,
                  progress: Callable[[int], None] | None = None) -> dict[str, list[str]]:
    """Ask the base instruct model for questions about each memory, in batches; filtered."""
    import copy

    import torch

    # A copy of its own: the padding set here would otherwise reach asks running meanwhile (a
    # server training), and a fast tokenizer used from two threads while one changes its
    # padding fails ("Already borrowed").
    tok, model = copy.deepcopy(base.tokenizer), base.model
    out: dict[str, list[str]] = {}
    torch.manual_seed(seed)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    for i in range(0, len(memories), batch_size):
        chunk = memories[i:i + batch_size]
        prompts = [tok.apply_chat_template([{"role": "user", "content": llm_prompt(t, n)}], tokenize=False,
                                           add_generation_prompt=True) + "- " if tok.chat_template else llm_prompt(t, n)
                   for _, t in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not tok.chat_template).to(base.device)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=24 * n, do_sample=True, temperature=0.7, top_p=0.9,
                                 pad_token_id=tok.pad_token_id)
        for (memory_id, text), seq in zip(chunk, gen[:, enc.input_ids.shape[1]:]):
            lines = tok.decode(seq, skip_special_tokens=True).split("\n")
            qs = [ln.strip().lstrip("-*0123456789. ").strip() for ln in lines]
            out[memory_id] = dedupe(q for q in qs if keep_generated(q, text))[:n]
        if progress:
            progress(len(chunk))
    return out


# Questions no personal memory answers; used to calibrate when to say "no memory".
OFF_TOPIC = [
    "What is the capital of France?", "How do I boil an egg?", "What's the weather like on Mars?",
    "Who wrote Hamlet?", "How many legs does a spider have?", "What is the speed of light?",
    "Translate 'good morning' into Spanish.", "What is 17 times 23?", "Who won the 1998 World Cup?",
    "How do airplanes stay in the air?", "What is photosynthesis?", "Recommend a good sci-fi novel.",
    "What's the tallest mountain in the world?", "How do I reset a router?", "What does DNA stand for?",
    "Explain quantum computing simply.", "What's a good name for a goldfish?", "How far is the Moon?",
    "Who painted the Mona Lisa?", "What year did World War II end?", "How do you make sourdough bread?",
    "What is the boiling point of water?", "Write a haiku about autumn.", "What is the largest ocean?",
    "How many continents are there?", "What is inflation?", "Who invented the telephone?",
    "What's the best way to learn a language?", "How do vaccines work?", "What is a black hole?",
]
