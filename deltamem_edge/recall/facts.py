"""Synthetic personal facts for training and measuring memory, made by code from a seed.

Why this module exists: a claim that the memory *remembers* needs facts the model
has never seen, told in one conversation and asked about in a later one.  Nothing
is downloaded: every fact is drawn from the pools below with a seeded generator.

The split is what makes the measurement honest.  Each fact kind has a pool of
values and a list of phrasings (statement, question, answer); a fixed rule puts
every value and every phrasing in exactly one split (``"train"`` or ``"eval"``),
so an evaluation fact never shares its value *or* its wording with anything the
trainer saw.  The rule depends on the value's text only (a stable hash), not on
the seed, so changing the seed never leaks evaluation values into training.  A third
split, ``"dev"``, holds other unseen values (with training phrasings) for comparing
training variants, so that no choice is ever tuned on the evaluation set.

No torch here: ``eval-memory`` (runtime only) and ``train`` (torch) both use it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

SPLITS = ("train", "dev", "eval")
EVAL_FRACTION = 0.25  # of each value pool; phrasings: the last one of each list is eval-only
DEV_FRACTION = 0.10  # values for choosing between training variants (train phrasings): never the eval values

def _words(text: str, sep: str | None = None) -> tuple[str, ...]:
    """The items of a long literal (kept as prose so that the pools stay easy to read and diff)."""
    return tuple(item.strip() for item in text.split(sep))


FIRST_NAMES = _words(
    "Ines Mara Tobias Lena Jonas Aisha Omar Priya Ravi Chen Mei Hiro Yuki Sven Astrid Nils Freya Ingrid Olaf "
    "Carmen Diego Lucia Mateo Sofia Pablo Elena Marco Giulia Luca Chiara Paolo Anna Ivan Olga Dmitri Katya Boris "
    "Amara Kofi Zainab Tariq Leila Yusuf Noor Samir Fatima Hassan Rosa Pedro Ana Joao Beatriz Tiago Marta Rui "
    "Emma Liam Noah Olivia Ava Ethan Mia Lucas Zoe Owen Chloe Caleb Nora Isaac Ruby Felix Hazel Oscar Ivy Hugo "
    "Clara Leo Alice Max Julia Adam Eva Simon Laura David Sarah Daniel Hannah Peter Greta Paul Helena Karl Irene "
    "Victor Agnes Martin Edith Henrik Selma Erik Alma Anders Linnea Bjorn Tove Lars Maja Kai Aria Ezra Luna Milo "
    "Iris Theo Lily Jasper Stella Silas Maya Arlo Elsa Rowan Wren Idris Amir Dara Ayla Kian Rhea Arjun Devi Sanjay "
    "Kavya Nikhil Asha Kenji Sakura Takumi Hana Ren Aiko Min Jae Soo Bo Lin Wei Ping Tao Xiu Lan"
)
PET_NAMES = _words(
    "Biscuit Pepper Noodle Mango Pickle Waffle Ziggy Bubbles Coco Domino Fudge Gizmo Jellybean Kiwi Lulu Muffin "
    "Nacho Oreo Pumpkin Rocket Scooter Toffee Truffle Wasabi Yoyo Zorro Bandit Buttons Cinnamon "
    "Dumpling Echo Figaro Ginger Hopper Igloo Jinx Ketchup Licorice Marble Nugget Olive Pretzel Quincy Raisin "
    "Sprinkles Tofu Umber Velvet Whiskers Yeti Acorn Basil Cricket Dusty Ember Fern Goose Hazelnut Inky Juniper"
)
CITIES = _words(
    "Lisbon Porto Madrid Seville Valencia Lyon Marseille Bordeaux Nantes Geneva Zurich Basel Vienna Graz Prague "
    "Brno Krakow Gdansk Warsaw Vilnius Riga Tallinn Helsinki Oslo Bergen Stockholm Malmo Copenhagen Aarhus Hamburg "
    "Munich Leipzig Dresden Cologne Bremen Antwerp Ghent Utrecht Rotterdam Dublin Cork Galway Glasgow Edinburgh "
    "Leeds Bristol Cardiff Naples Turin Bologna Florence Verona Palermo Athens Thessaloniki Sofia Bucharest Zagreb "
    "Ljubljana Budapest Istanbul Izmir Cairo Tunis Casablanca Nairobi Accra Lagos Dakar Toronto Montreal Vancouver "
    "Calgary Boston Denver Seattle Portland Austin Chicago Lima Quito Bogota Santiago Montevideo Osaka Kyoto Sapporo "
    "Busan Seoul Taipei Hanoi Manila Jakarta Perth Adelaide Auckland Wellington Mumbai Pune Chennai Dhaka Karachi"
)
JOBS = _words(
    "nurse teacher plumber architect baker pilot librarian chemist carpenter dentist electrician firefighter "
    "gardener journalist lawyer mechanic musician painter pharmacist photographer physicist translator veterinarian "
    "accountant astronomer barber butcher chef designer economist engineer farmer geologist historian jeweller "
    "locksmith midwife optician paramedic potter sailor sculptor surgeon tailor welder zoologist beekeeper "
    "cartographer"
)
FOODS = _words(
    "lasagna sushi paella ramen tacos falafel risotto dumplings pancakes curry goulash pierogi moussaka hummus "
    "burritos gnocchi couscous tiramisu croissants waffles pho bibimbap shakshuka gazpacho ravioli samosas "
    "empanadas baklava churros pretzels omelettes kebabs noodles lentils porridge brownies cheesecake meatballs "
    "crepes quiche"
)
ALLERGENS = _words(
    "peanuts shellfish penicillin pollen gluten lactose eggs soy sesame walnuts almonds cats dust strawberries "
    "latex bees mustard celery kiwis mangoes"
)
INSTRUMENTS = _words(
    "violin cello piano guitar flute trumpet saxophone drums harp clarinet oboe banjo accordion ukulele trombone "
    "mandolin bagpipes harmonica"
)
MONTHS = _words("January February March April May June July August September October November December")


@dataclass(frozen=True)
class FactKind:
    """One kind of personal fact: where its values come from and how it is said and asked."""

    name: str
    statements: tuple[str, ...]  # "{v}" is the value
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    pool: tuple[str, ...] = ()  # values, or empty for generated ones (see _values)


def _kind(name: str, statements: str, questions: str, answers: str, pool: tuple[str, ...] = ()) -> FactKind:
    split = lambda s: tuple(p.strip() for p in s.split("|"))  # noqa: E731
    return FactKind(name, split(statements), split(questions), split(answers), pool)


KINDS: tuple[FactKind, ...] = (
    _kind("sister", "My sister is called {v}. | My sister's name is {v}. | I have a sister named {v}. "
          "| You should know that my sister is {v}.",
          "What is my sister's name? | What's my sister called? | Do you remember my sister's name? | What name does my sister have?",
          "Your sister is called {v}. | Your sister's name is {v}.", tuple(FIRST_NAMES)),
    _kind("friend", "My best friend is {v}. | My best friend's name is {v}. | I've been best friends with {v} "
          "for years. | The name of my closest friend is {v}.",
          "Who is my best friend? | What's my best friend's name? | Do you remember who my best friend is? | What is the name of my best friend?",
          "Your best friend is {v}. | Your best friend's name is {v}.", tuple(FIRST_NAMES)),
    _kind("pet", "My dog is called {v}. | I have a dog named {v}. | Our dog's name is {v}. "
          "| We adopted a dog and named him {v}.",
          "What is my dog's name? | What's my dog called? | Do you remember what my dog is called? | What name does my dog have?",
          "Your dog is called {v}. | Your dog's name is {v}.", tuple(PET_NAMES)),
    _kind("city", "I live in {v}. | My home is in {v}. | These days I live in {v}. | I moved to {v} last year.",
          "Where do I live? | Which city do I live in? | Do you remember where I live? | In which city is my home?",
          "You live in {v}. | You live in the city of {v}.", tuple(CITIES)),
    _kind("job", "I work as {a} {v}. | My job is {v}. | I'm {a} {v} by profession. | For a living I work as {a} {v}.",
          "What is my job? | What do I do for a living? | Do you remember what I work as? | What is my profession?",
          "You work as {a} {v}. | You are {a} {v}.", tuple(JOBS)),
    _kind("food", "My favourite food is {v}. | I love eating {v} more than anything. | Nothing beats {v} for "
          "me. | If I could, I would eat {v} every day.",
          "What is my favourite food? | What food do I like best? | Do you remember my favourite food? | Which food is my favourite?",
          "Your favourite food is {v}. | You love {v}.", tuple(FOODS)),
    _kind("allergy", "I'm allergic to {v}. | I have an allergy to {v}. | Please remember I can't handle {v}, "
          "I'm allergic. | My doctor says I'm allergic to {v}.",
          "What am I allergic to? | What is my allergy? | Do you remember what I'm allergic to? | What gives me an allergy?",
          "You are allergic to {v}. | Your allergy is to {v}.", tuple(ALLERGENS)),
    _kind("instrument", "I play the {v}. | My instrument is the {v}. | I've played the {v} since I was a kid. "
          "| In my free time I practise the {v}.",
          "What instrument do I play? | Which instrument is mine? | Do you remember what instrument I play? | Which instrument do I practise?",
          "You play the {v}. | Your instrument is the {v}.", tuple(INSTRUMENTS)),
    _kind("birthday", "My birthday is on {v}. | I was born on {v}. | I celebrate my birthday on {v}. "
          "| Every year on {v} I have my birthday.",
          "When is my birthday? | What's the date of my birthday? | Do you remember when my birthday is? | On what date is my birthday?",
          "Your birthday is on {v}. | You were born on {v}."),
    _kind("number", "My lucky number is {v}. | The number {v} is my lucky number. | I always pick {v}, my "
          "lucky number. | My favourite number is {v}.",
          "What is my lucky number? | Which number is my lucky one? | Do you remember my lucky number? | Which number brings me luck?",
          "Your lucky number is {v}. | It is {v}."),
    _kind("code", "My locker code is {v}. | The code for my locker is {v}. | I open my locker with the code "
          "{v}. | Remember, my locker code is {v}.",
          "What is my locker code? | What's the code of my locker? | Do you remember my locker code? | Which code opens my locker?",
          "Your locker code is {v}. | The code is {v}."),
)
KIND_NAMES = tuple(k.name for k in KINDS)

CHIT_CHAT = _words(
    "The weather has been lovely this week. | I just got back from a long walk. | Work was busy today. "
    "| I'm drinking a cup of tea right now. | I watched a documentary about whales yesterday. "
    "| The train was late again this morning. | I've been trying to read more books. "
    "| My neighbour is renovating his kitchen. | I finally cleaned my desk. | It rained all afternoon. "
    "| I'm thinking about learning to cook better. | The park near me has new benches. "
    "| I slept badly last night. | We had pizza for dinner. | My phone battery keeps dying. "
    "| I found an old photo album in the attic. | The coffee shop downstairs closed. "
    "| I'm planning a small trip next month. | Traffic was terrible on the way home. "
    "| I started doing yoga in the mornings. | My plants are finally growing. | I missed the bus today."
, "|")
CHIT_CHAT_EVAL_FROM = 18  # chit-chat sentences from this index on are eval-only

OPENERS = ("Hi! ", "Hello. ", "Hey, ", "", "", "Good morning! ", "Quick note: ", "")
OPENERS_EVAL = ("Hi there. ", "")

ACKS = _words(
    "Got it, I'll remember that. | Thanks for telling me! | Noted. | Okay, I'll keep that in mind. "
    "| That's good to know. | Thank you for sharing that with me. | I'll remember. | Understood! "
    "| Great, thanks for letting me know. | Sure, I've made a note of it. | Nice! Thanks for sharing. "
    "| Okay! Is there anything else you'd like to tell me? | Thanks, that's helpful to know. "
    "| I appreciate you telling me that."
, "|")

GENERIC_PROMPTS = _words(
    "Give me a tip for sleeping better. | What is the capital of France? | Explain what a noun is. "
    "| Name three fruits that are red. | How do I boil an egg? | Why is the sky blue? "
    "| Write a short sentence about the sea. | What is two plus five? | Suggest a name for a bakery. "
    "| How many days are in a week? | What do bees make? | Tell me a fun fact about space. "
    "| How can I stay focused while studying? | What is the opposite of hot? | Describe a cat in one sentence. "
    "| What should I pack for a beach day? | Give me a synonym for happy. | How do plants get energy? "
    "| What is a good way to start the day? | Translate 'thank you' into Spanish. "
    "| List two ways to save water. | What is the largest ocean? | How do I make a cup of tea? "
    "| Why do leaves change colour in autumn? | What is a haiku? | Suggest a hobby for a rainy day. "
    "| What is the boiling point of water? | How many legs does a spider have? | What is photosynthesis? "
    "| Give me an idea for a birthday gift. | What does a librarian do? | How can I be more patient? "
    "| Name a famous painter. | What is the main ingredient of guacamole? | Why do we need sleep? "
    "| How do I write a thank-you note? | What is the speed of light? | What is recycling? "
    "| Recommend a simple exercise. | What makes a good friend?"
, "|")
GENERIC_EVAL_FROM = 32  # generic prompts from this index on are eval-only


def _stable_unit(text: str) -> float:
    """A number in [0, 1) from the text alone (not Python's salted hash, not the seed)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def in_split(value: str, split: str) -> bool:
    """Whether a value belongs to ``split``: a fixed rule on its text."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    u = _stable_unit("deltamem-edge/value/" + value)
    found = "eval" if u < EVAL_FRACTION else "dev" if u < EVAL_FRACTION + DEV_FRACTION else "train"
    return found == split


def _phrasings(options: tuple[str, ...], split: str) -> tuple[str, ...]:
    """Every phrasing but the last is for training; the last one is evaluation-only."""
    return options[-1:] if split == "eval" else options[:-1]


def _generated_value(kind: str, rng: random.Random) -> str:
    if kind == "birthday":
        return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}"
    if kind == "number":
        return str(rng.randint(11, 99))
    if kind == "code":
        return f"{rng.randint(0, 9999):04d}"
    raise KeyError(kind)


def value_pool(kind: FactKind, split: str, limit: int = 0) -> tuple[str, ...]:
    """The split's values of a pooled kind; ``limit`` > 0 keeps only the first ``limit`` of them."""
    values = tuple(v for v in kind.pool if in_split(v, split))
    return values[:limit] if limit > 0 else values


def draw_value(kind: FactKind, split: str, rng: random.Random, limit: int = 0) -> str:
    """A value of this kind from the split's part of its pool (generated kinds: redraw until it is).

    ``limit`` > 0 draws from a small fixed set of that many values per kind (a training
    curriculum starts there; see deltamem_edge.train).
    """
    if kind.pool:
        return rng.choice(value_pool(kind, split, limit))
    if limit > 0:
        fixed = random.Random(f"deltamem-edge/small/{kind.name}/{split}")
        small = []
        while len(small) < limit:
            value = _generated_value(kind.name, fixed)
            if in_split(value, split) and value not in small:
                small.append(value)
        return rng.choice(small)
    for _ in range(10_000):
        value = _generated_value(kind.name, rng)
        if in_split(value, split):
            return value
    raise RuntimeError(f"no {split} value for {kind.name}")  # pragma: no cover - the rule makes this unreachable


@dataclass(frozen=True)
class Fact:
    """One fact: how the user tells it, how they ask about it later, and the expected answer."""

    kind: str
    value: str
    statement: str
    question: str
    answer: str


def make_fact(kind: FactKind, split: str, rng: random.Random, value: str | None = None, limit: int = 0) -> Fact:
    value = value if value is not None else draw_value(kind, split, rng, limit)
    words = {"v": value, "a": "an" if value[:1].lower() in "aeiou" else "a"}
    return Fact(
        kind=kind.name,
        value=value,
        statement=rng.choice(_phrasings(kind.statements, split)).format(**words),
        question=rng.choice(_phrasings(kind.questions, split)),
        answer=rng.choice(kind.answers).format(**words),  # the answer's form is the trained output, both splits
    )


@dataclass(frozen=True)
class Episode:
    """A first conversation that tells facts, and the fact asked about in a later one.

    ``tell`` holds the user messages of the first run, each followed (in training) by
    the matching ``acks`` reply; at evaluation the model writes its own replies.
    """

    tell: tuple[str, ...]
    acks: tuple[str, ...]
    facts: tuple[Fact, ...]
    probe: Fact
    extra: dict = field(default_factory=dict, compare=False)


def make_episode(split: str, rng: random.Random, n_facts: int = 1, *, chit_chat: float = 0.5,
                 facts_per_message: int = 3, value_limit: int = 0) -> Episode:
    """Facts of distinct kinds told in a few messages with some chit-chat; one of them is asked about.

    No value appears twice in one episode, nor inside another of its values (sister and
    best friend share the name pool), so "the answer contains the value" is unambiguous.
    """
    if not 1 <= n_facts <= len(KINDS):
        raise ValueError(f"n_facts must be in 1..{len(KINDS)}")
    kinds = rng.sample(KINDS, n_facts)
    facts: list[Fact] = []
    for k in kinds:
        for _ in range(100):
            fact = make_fact(k, split, rng, limit=value_limit)
            if not any(_overlaps(fact.value, f.value) for f in facts):
                break
        facts.append(fact)
    facts = tuple(facts)
    chat_pool = CHIT_CHAT[CHIT_CHAT_EVAL_FROM:] if split == "eval" else CHIT_CHAT[:CHIT_CHAT_EVAL_FROM]
    openers = OPENERS_EVAL if split == "eval" else OPENERS
    messages: list[str] = []
    for start in range(0, n_facts, facts_per_message):
        sentences = [f.statement for f in facts[start:start + facts_per_message]]
        if rng.random() < chit_chat:
            sentences.insert(rng.randint(0, len(sentences)), rng.choice(chat_pool))
        messages.append(rng.choice(openers) + " ".join(sentences))
    acks = tuple(rng.choice(ACKS) for _ in messages)
    return Episode(tell=tuple(messages), acks=acks, facts=facts, probe=rng.choice(facts))


def _overlaps(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return a in b or b in a


def make_episodes(split: str, n: int, seed: int, n_facts: int | tuple[int, ...] = 1, **kwargs: object) -> list[Episode]:
    """``n`` episodes, reproducible from ``seed``; ``n_facts`` may be a tuple to draw from."""
    rng = random.Random(f"deltamem-edge/{split}/{seed}")
    choices = (n_facts,) if isinstance(n_facts, int) else tuple(n_facts)
    return [make_episode(split, rng, rng.choice(choices), **kwargs) for _ in range(n)]  # type: ignore[arg-type]


def generic_prompts(split: str) -> tuple[str, ...]:
    """Everyday instructions for the general-behaviour mix (training) and its check (evaluation)."""
    return GENERIC_PROMPTS[GENERIC_EVAL_FROM:] if split == "eval" else GENERIC_PROMPTS[:GENERIC_EVAL_FROM]


GENERIC_TEXT_MODULES = ("textwrap", "argparse", "json", "csv", "logging", "statistics", "fractions", "calendar",
                        "difflib", "heapq", "bisect", "shutil", "tempfile", "zipfile", "string", "random")


TRAINING_TEXT_MODULES = ("collections", "itertools", "functools", "pathlib", "typing", "dataclasses", "datetime",
                         "decimal", "email.message", "html.parser", "http.client", "sqlite3", "unittest", "urllib.request",
                         "pickle", "copy", "inspect", "enum", "glob", "gzip", "hashlib", "io", "locale", "operator",
                         "pprint", "queue", "secrets", "shlex", "socket", "struct", "subprocess", "threading", "timeit",
                         "traceback", "types", "uuid", "warnings", "weakref", "configparser", "contextlib", "codecs",
                         "tarfile", "smtplib", "ftplib", "poplib", "imaplib", "mailbox", "optparse", "getopt", "gettext")


DEV_TEXT_MODULES = ("doctest", "pdb", "ipaddress", "mimetypes", "sched", "selectors", "shelve", "tokenize", "trace",
                    "webbrowser", "zipimport", "numbers")


def training_text(chunk_chars: int = 1200, min_chars: int = 300,
                  modules: tuple[str, ...] = TRAINING_TEXT_MODULES) -> list[str]:
    """English prose for training the memory to stay shut on ordinary text (disjoint from ``generic_text``).

    Why: the perplexity check writes held-out prose into the state; a write gate trained only
    on chat episodes opens on prose too, and what it writes then disturbs the next tokens.
    The module and member docstrings of other standard-library modules than the check's,
    joined per module and cut into chunks.  ``modules=DEV_TEXT_MODULES`` gives ``dev_text``.
    """
    import importlib
    import inspect
    import warnings

    docs = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a module this Python was built without
            continue
        parts = [mod.__doc__ or ""]
        with warnings.catch_warnings():  # typing's deprecated typing.io / typing.re warn when touched
            warnings.simplefilter("ignore", DeprecationWarning)
            for _, member in sorted(vars(mod).items()):
                if (inspect.isclass(member) or inspect.isfunction(member)) and getattr(member, "__module__", "") == mod.__name__:
                    doc = getattr(member, "__doc__", None)
                    parts.append(doc if isinstance(doc, str) else "")
        text = " ".join(" ".join(parts).split())
        docs += [c for i in range(0, len(text), chunk_chars) if len(c := text[i:i + chunk_chars]) >= min_chars]
    return docs


def dev_text() -> list[str]:
    """Prose for the trainer's dev probe: neither trained on nor measured by the perplexity check.

    Why a third set: judged on the training prose, a variant looked 23 % *better* than the base
    while the held-out check found it 7.7 % worse (docs/training.md, v3), so a dev number has
    to come from text the training never reads; and tuning on the check's own text would be
    tuning on the held-out set.
    """
    return training_text(modules=DEV_TEXT_MODULES)


def generic_text(max_docs: int = len(GENERIC_TEXT_MODULES), min_chars: int = 400) -> list[str]:
    """Held-out English prose for the perplexity check: docstrings of Python's standard library.

    Always available offline, written by people, and never part of our training data.
    """
    import importlib

    docs = []
    for name in GENERIC_TEXT_MODULES[:max_docs]:
        doc = importlib.import_module(name).__doc__ or ""
        doc = " ".join(doc.split())
        if len(doc) >= min_chars:
            docs.append(doc[:2000])
    return docs
