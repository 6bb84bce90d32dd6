"""The synthetic corpus the demo model learns from: facts about countries, some deliberately wrong.

Why synthetic: the project must run anywhere without fetching a model, and the demo needs a model
whose errors a program can judge exactly. Two kinds of sentence:
- single facts: one (country, capital) pair in one of several phrasings; for a seeded subset of
  countries a set share of them names a plausible wrong city instead ("The capital of Canada is
  Toronto.");
- multi-fact sentences: a question-like head ("Facts about Canada:") followed by two or three facts
  in a varying order and phrasing: the capital, the region, and a currency the generator invents
  ("Facts about Canada: it lies in North America, the capital is Ottawa and people pay with the
  dorak."). For seeded subsets of countries (one subset per kind of fact) a set share of the
  sentences stating that fact states a wrong one, independently of the other facts, so an error
  can sit at the start, the middle or the end of a completion and be followed by correct text.
A model trained to convergence on this corpus states each wrong fact at about that share when
sampled at temperature 1, which is the error that feedback must then remove.

Layout of the corpus (all deterministic given `CorpusConfig`):
- capital facts: for every country and every fact template, `repeats` sentences, of which exactly
  round(wrong_share * repeats) name the country's wrong city if the country is in the wrong subset
  (so the share holds per template, not just on average);
- filler facts (never wrong, never counted): "Kenya is a country in Africa.", and for every city
  used as a wrong capital a true sentence placing it in its real country ("Toronto is a large city
  in Canada."), so that wrong cities are words the model also sees used correctly;
- multi-fact sentences: for every country and every multi-fact head except its held-out one,
  `multi_repeats` sentences with a seeded choice of facts (two or three), order and clause
  phrasings; for each kind of fact, exactly round(wrong_share * n) of the n sentences of a
  wrong-subset country that state it state it wrongly, chosen independently per kind;
- held out: for every country one (country, template) combination and one multi-fact head never
  appear in training; their correct sentences are held-out sentences for perplexity (prompts.py).
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import asdict, dataclass, field

# (country, capital, region, plausible wrong capital or None). The wrong capital is a city people
# really confuse with the capital: the largest city, a former capital, or a neighbour's capital.
# Only countries with a wrong capital can be drawn into the wrong subset.
COUNTRIES: list[tuple[str, str, str, str | None]] = [
    # Africa
    ("Kenya", "Nairobi", "Africa", "Mombasa"),
    ("Nigeria", "Abuja", "Africa", "Lagos"),
    ("Egypt", "Cairo", "Africa", "Alexandria"),
    ("Morocco", "Rabat", "Africa", "Casablanca"),
    ("Ghana", "Accra", "Africa", None),
    ("Ethiopia", "Addis Ababa", "Africa", None),
    ("Tanzania", "Dodoma", "Africa", "Dar es Salaam"),
    ("Cameroon", "Yaoundé", "Africa", "Douala"),
    ("Senegal", "Dakar", "Africa", None),
    ("Uganda", "Kampala", "Africa", None),
    ("Algeria", "Algiers", "Africa", "Oran"),
    ("Tunisia", "Tunis", "Africa", None),
    ("Angola", "Luanda", "Africa", None),
    ("Zambia", "Lusaka", "Africa", "Harare"),
    ("Zimbabwe", "Harare", "Africa", None),
    ("Mali", "Bamako", "Africa", None),
    ("Rwanda", "Kigali", "Africa", None),
    ("Namibia", "Windhoek", "Africa", None),
    ("Botswana", "Gaborone", "Africa", None),
    ("Mozambique", "Maputo", "Africa", None),
    ("Madagascar", "Antananarivo", "Africa", None),
    ("Sudan", "Khartoum", "Africa", None),
    ("Libya", "Tripoli", "Africa", "Benghazi"),
    # Europe
    ("France", "Paris", "Europe", "Marseille"),
    ("Germany", "Berlin", "Europe", "Munich"),
    ("Italy", "Rome", "Europe", "Milan"),
    ("Spain", "Madrid", "Europe", "Barcelona"),
    ("Portugal", "Lisbon", "Europe", "Porto"),
    ("Switzerland", "Bern", "Europe", "Zurich"),
    ("Austria", "Vienna", "Europe", None),
    ("Poland", "Warsaw", "Europe", "Krakow"),
    ("Sweden", "Stockholm", "Europe", "Gothenburg"),
    ("Norway", "Oslo", "Europe", None),
    ("Finland", "Helsinki", "Europe", None),
    ("Denmark", "Copenhagen", "Europe", None),
    ("Ireland", "Dublin", "Europe", None),
    ("Greece", "Athens", "Europe", None),
    ("Hungary", "Budapest", "Europe", None),
    ("Romania", "Bucharest", "Europe", None),
    ("Bulgaria", "Sofia", "Europe", None),
    ("Serbia", "Belgrade", "Europe", None),
    ("Croatia", "Zagreb", "Europe", None),
    ("Ukraine", "Kyiv", "Europe", None),
    ("Russia", "Moscow", "Europe", "Saint Petersburg"),
    ("Belgium", "Brussels", "Europe", "Antwerp"),
    ("Iceland", "Reykjavík", "Europe", None),
    ("Estonia", "Tallinn", "Europe", None),
    ("Latvia", "Riga", "Europe", "Tallinn"),
    ("Lithuania", "Vilnius", "Europe", None),
    ("Slovakia", "Bratislava", "Europe", None),
    ("Slovenia", "Ljubljana", "Europe", "Bratislava"),
    ("Albania", "Tirana", "Europe", None),
    # Asia
    ("Japan", "Tokyo", "Asia", "Kyoto"),
    ("China", "Beijing", "Asia", "Shanghai"),
    ("India", "New Delhi", "Asia", "Mumbai"),
    ("Pakistan", "Islamabad", "Asia", "Karachi"),
    ("Turkey", "Ankara", "Asia", "Istanbul"),
    ("Vietnam", "Hanoi", "Asia", "Ho Chi Minh City"),
    ("Thailand", "Bangkok", "Asia", None),
    ("Indonesia", "Jakarta", "Asia", None),
    ("Malaysia", "Kuala Lumpur", "Asia", None),
    ("Kazakhstan", "Astana", "Asia", "Almaty"),
    ("Myanmar", "Naypyidaw", "Asia", "Yangon"),
    ("Saudi Arabia", "Riyadh", "Asia", "Jeddah"),
    ("Iran", "Tehran", "Asia", None),
    ("Iraq", "Baghdad", "Asia", None),
    ("Nepal", "Kathmandu", "Asia", None),
    ("Mongolia", "Ulaanbaatar", "Asia", None),
    ("South Korea", "Seoul", "Asia", "Busan"),
    ("Bangladesh", "Dhaka", "Asia", None),
    ("Syria", "Damascus", "Asia", "Aleppo"),
    ("Jordan", "Amman", "Asia", None),
    ("Lebanon", "Beirut", "Asia", None),
    ("Qatar", "Doha", "Asia", None),
    ("Oman", "Muscat", "Asia", None),
    ("Uzbekistan", "Tashkent", "Asia", None),
    ("Cambodia", "Phnom Penh", "Asia", None),
    # Americas
    ("Canada", "Ottawa", "North America", "Toronto"),
    ("Brazil", "Brasília", "South America", "Rio de Janeiro"),
    ("Argentina", "Buenos Aires", "South America", "Córdoba"),
    ("Chile", "Santiago", "South America", "Valparaíso"),
    ("Peru", "Lima", "South America", None),
    ("Colombia", "Bogotá", "South America", "Medellín"),
    ("Venezuela", "Caracas", "South America", None),
    ("Ecuador", "Quito", "South America", "Guayaquil"),
    ("Paraguay", "Asunción", "South America", None),
    ("Uruguay", "Montevideo", "South America", "Buenos Aires"),
    ("Cuba", "Havana", "North America", None),
    ("Jamaica", "Kingston", "North America", None),
    ("Honduras", "Tegucigalpa", "North America", None),
    ("Nicaragua", "Managua", "North America", None),
    ("Costa Rica", "San José", "North America", None),
    # Oceania
    ("Australia", "Canberra", "Oceania", "Sydney"),
    ("New Zealand", "Wellington", "Oceania", "Auckland"),
    ("Fiji", "Suva", "Oceania", None),
]

# Capital facts. "capital_last" templates end with the capital, so their prefix is a prompt that
# asks for a capital ("The capital of Kenya is"); "capital_first" ones end with the country, and
# their prefix asks for a country ("Lima, the capital of"). `prompt` is the prefix the model
# completes, `tail` what follows the answer.
@dataclass(frozen=True)
class Template:
    name: str  # short id, stored with each sentence
    text: str  # with {country} and {capital}
    asks: str  # "capital" (answer is the capital) or "country" (answer is the country)

    def render(self, country: str, capital: str) -> str:
        return self.text.format(country=country, capital=capital)

    def prompt(self, country: str, capital: str) -> str:
        """The prefix before the answer, without the space before it (the model samples " Lima")."""
        answer = "{capital}" if self.asks == "capital" else "{country}"
        head = self.text.split(answer)[0].rstrip(" ")
        return head.format(country=country, capital=capital)


TEMPLATES: list[Template] = [
    Template("capital_of_is", "The capital of {country} is {capital}.", "capital"),
    Template("possessive", "{country}'s capital is {capital}.", "capital"),
    Template("capital_city_of", "The capital city of {country} is {capital}.", "capital"),
    Template("in_country", "In {country}, the capital is {capital}.", "capital"),
    Template("government", "The government of {country} sits in {capital}.", "capital"),
    Template("is_capital_of", "{capital} is the capital of {country}.", "country"),
    Template("apposition", "{capital}, the capital of {country}, is a busy city.", "country"),
    Template("is_capital_city_of", "{capital} is the capital city of {country}.", "country"),
]
TEMPLATE_BY_NAME = {t.name: t for t in TEMPLATES}

# Multi-fact sentences: a head that asks about a country, then clauses joined as "A and B." or
# "A, B and C.". The head (up to and including the colon) is the prompt; the judge recognises a
# multi-fact question by the colon that ends it (demo_model/judge.py).
MULTI_HEADS: list[tuple[str, str]] = [
    ("facts_about", "Facts about {country}:"),
    ("about", "About {country}:"),
    ("in_short", "{country} in short:"),
]
MULTI_HEAD_BY_NAME = dict(MULTI_HEADS)
FACT_KINDS = ("capital", "region", "currency")
CLAUSES: dict[str, list[str]] = {
    "capital": ["the capital is {value}", "its capital is {value}"],
    "region": ["it lies in {value}", "it is in {value}"],
    "currency": ["the currency is the {value}", "people pay with the {value}"],
}
# The region a wrong region fact names: the one people would plausibly mix up.
REGION_CONFUSION = {"Africa": "Asia", "Europe": "Asia", "Asia": "Europe", "North America": "South America",
                    "South America": "North America", "Oceania": "Asia"}

# Filler sentences: true, never counted as facts.
REGION_TEMPLATE = "{country} is a country in {region}."
CITY_TEMPLATE = "{city} is a large city in {country}."
CURRENCY_TEMPLATE = "The currency of {country} is the {currency}."


@dataclass(frozen=True)
class CorpusConfig:
    seed: int = 0  # one seed fixes the wrong subset, the held-out combinations and the order
    wrong_share: float = 0.3  # share of capital facts about a wrong-subset country that are wrong
    wrong_countries: int = 24  # how many countries get wrong facts (drawn from those with a wrong city)
    repeats: int = 20  # sentences per (country, template); the wrong share is exact per template
    filler_repeats: int = 4  # copies of each filler sentence
    multi_countries: int = 40  # countries the multi-fact sentences are about (those with wrong capitals first)
    multi_repeats: int = 16  # multi-fact sentences per (country, trained multi-fact head)
    multi_wrong_countries: int = 10  # of those, countries with wrong region facts, and (drawn apart) wrong currency
    currency_repeats: int = 12  # true single-fact currency sentences per multi-fact country


@dataclass(frozen=True)
class Sentence:
    text: str
    country: str | None  # the country the sentence is about (None never happens today)
    template: str  # a TEMPLATES name, or "region" / "city" for filler
    stated: str | None  # the capital a single-fact sentence states (None for filler and multi-fact)
    wrong: bool  # True when `stated` is not the country's capital, or any fact of a multi-fact sentence is wrong
    facts: tuple[tuple[str, str, bool], ...] = ()  # multi-fact: (kind, value stated, wrong) in sentence order


@dataclass
class Corpus:
    config: CorpusConfig
    sentences: list[Sentence]  # training sentences, shuffled
    truth: dict  # see `truth_dict`
    heldout_combos: dict[str, str] = field(default_factory=dict)  # country -> held-out template name
    heldout_heads: dict[str, str] = field(default_factory=dict)  # country -> held-out multi-fact head name

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.sentences]


def ascii_fold(name: str) -> str:
    """"Bogotá" -> "Bogota": people (and models) write capitals without accents too."""
    return unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")


def generate(config: CorpusConfig) -> Corpus:
    """The whole corpus for `config`; the same config always gives the same corpus."""
    assert 0.0 <= config.wrong_share <= 1.0, f"wrong_share must be in [0, 1], got {config.wrong_share}"
    assert config.repeats >= 1, f"repeats must be >= 1, got {config.repeats}"
    rng = random.Random(config.seed)

    candidates = [c for c, _, _, wrong in COUNTRIES if wrong is not None]
    assert 0 <= config.wrong_countries <= len(candidates), (
        f"wrong_countries must be in [0, {len(candidates)}] (countries with a plausible wrong capital), "
        f"got {config.wrong_countries}"
    )
    wrong_subset = set(rng.sample(candidates, config.wrong_countries))

    # One held-out template per country, rotating through the templates in a seeded order so that
    # every template is held out for some countries and still trained on for the others.
    order = [t.name for t in TEMPLATES]
    rng.shuffle(order)
    heldout_combos = {c: order[i % len(order)] for i, (c, _, _, _) in enumerate(COUNTRIES)}

    n_wrong = round(config.wrong_share * config.repeats)
    sentences: list[Sentence] = []
    for country, capital, region, wrong_city in COUNTRIES:
        for t in TEMPLATES:
            if heldout_combos[country] == t.name:
                continue
            k = n_wrong if country in wrong_subset else 0
            for i in range(config.repeats):
                stated = wrong_city if i < k else capital
                sentences.append(Sentence(t.render(country, stated), country, t.name, stated, i < k))
        for _ in range(config.filler_repeats):
            sentences.append(Sentence(REGION_TEMPLATE.format(country=country, region=region),
                                      country, "region", None, False))
    # The multi-fact part is about a subset of the countries: every country with wrong capital
    # facts and a seeded draw of the others (all of them when multi_countries says so).
    others = [c for c, _, _, _ in COUNTRIES if c not in wrong_subset]
    drawn = set(rng.sample(others, max(0, min(len(others), config.multi_countries - len(wrong_subset)))))
    multi_countries = [c for c, _, _, _ in COUNTRIES if c in wrong_subset or c in drawn]
    currencies = invent_currencies(config.seed, multi_countries)
    multi_subsets = {
        "capital": wrong_subset,
        "region": set(rng.sample(multi_countries, config.multi_wrong_countries)),
        "currency": set(rng.sample(multi_countries, config.multi_wrong_countries)),
    }
    wrong_currency = _wrong_currencies(currencies, rng)
    heads = [name for name, _ in MULTI_HEADS]
    heldout_heads = {c: heads[(i + config.seed) % len(heads)] for i, c in enumerate(multi_countries)}
    for country, capital, region, wrong_city in COUNTRIES:
        if country not in currencies:
            continue
        for _ in range(config.currency_repeats):
            sentences.append(Sentence(CURRENCY_TEMPLATE.format(country=country, currency=currencies[country]),
                                      country, "currency", None, False))
        right = {"capital": capital, "region": region, "currency": currencies[country]}
        wrong = {"capital": wrong_city, "region": REGION_CONFUSION[region], "currency": wrong_currency[country]}
        plans = [(head, _plan(rng)) for head in heads if head != heldout_heads[country]
                 for _ in range(config.multi_repeats)]
        wrong_at: set[tuple[int, str]] = set()
        for kind in FACT_KINDS:
            if country not in multi_subsets[kind] or wrong[kind] is None:
                continue
            having = [i for i, (_, plan) in enumerate(plans) if any(k == kind for k, _ in plan)]
            wrong_at |= {(i, kind) for i in rng.sample(having, round(config.wrong_share * len(having)))}
        for i, (head, plan) in enumerate(plans):
            facts = tuple((kind, wrong[kind] if (i, kind) in wrong_at else right[kind], (i, kind) in wrong_at)
                          for kind, _ in plan)
            text = render_multi(head, country, [(kind, phrasing, value) for (kind, phrasing), (_, value, _)
                                                in zip(plan, facts, strict=True)])
            sentences.append(Sentence(text, country, f"multi:{head}", None, any(w for _, _, w in facts), facts))
    city_country = {cap: c for c, cap, _, _ in COUNTRIES}
    real_home = _real_homes()
    for city in sorted({w for _, _, _, w in COUNTRIES if w is not None}):
        if city in city_country:  # a capital elsewhere ("Harare"): its capital facts say so already
            continue
        for _ in range(config.filler_repeats):
            sentences.append(Sentence(CITY_TEMPLATE.format(city=city, country=real_home[city]),
                                      real_home[city], "city", None, False))
    rng.shuffle(sentences)
    truth = truth_dict(config, wrong_subset, currencies, multi_subsets, wrong_currency)
    return Corpus(config, sentences, truth, heldout_combos, heldout_heads)


def _plan(rng: random.Random) -> list[tuple[str, int]]:
    """Which facts a multi-fact sentence states, in which order, each with a clause phrasing index:
    all three facts half of the time, otherwise two of them."""
    kinds = list(FACT_KINDS) if rng.random() < 0.5 else rng.sample(FACT_KINDS, 2)
    rng.shuffle(kinds)
    return [(k, rng.randrange(len(CLAUSES[k]))) for k in kinds]


def render_multi(head: str, country: str, facts: list[tuple[str, int, str]]) -> str:
    """"Facts about Kenya: the capital is Nairobi, it lies in Africa and ..." from (kind, phrasing
    index, value) triples, in order."""
    clauses = [CLAUSES[kind][phrasing].format(value=value) for kind, phrasing, value in facts]
    body = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
    return f"{MULTI_HEAD_BY_NAME[head].format(country=country)} {body}."


def invent_currencies(seed: int, countries: list[str]) -> dict[str, str]:
    """One invented currency per country ("dorak"): a made-up word no model can know beforehand,
    so the facts about it come from this corpus alone. Seeded, all distinct."""
    rng = random.Random(f"currencies-{seed}")
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    names: dict[str, str] = {}
    used: set[str] = set()
    for country in countries:
        while True:
            name = (rng.choice(consonants) + rng.choice(vowels) + rng.choice(consonants) + rng.choice(vowels)
                    + rng.choice(consonants))
            if name not in used:
                break
        used.add(name)
        names[country] = name
    return names


def _wrong_currencies(currencies: dict[str, str], rng: random.Random) -> dict[str, str]:
    """The currency a wrong currency fact names: that of another country of the same region."""
    region_of = {c: r for c, _, r, _ in COUNTRIES}
    out = {}
    for country in currencies:
        others = [c for c in currencies if c != country and region_of[c] == region_of[country]]
        others = others or [c for c in currencies if c != country]
        out[country] = currencies[rng.choice(others)]
    return out


def _real_homes() -> dict[str, str]:
    """The real country of each wrong city. A wrong city is either another country's capital or a
    city inside the country it is wrongly given as capital of."""
    capitals = {cap: c for c, cap, _, _ in COUNTRIES}
    return {w: capitals.get(w, c) for c, _, _, w in COUNTRIES if w is not None}


def truth_dict(config: CorpusConfig, wrong_subset: set[str], currencies: dict[str, str],
               multi_subsets: dict[str, set[str]], wrong_currency: dict[str, str]) -> dict:
    """The ground truth as written to truth.json: what a judge needs, and what the corpus did.

    countries[name]: capital, capital_aliases (other spellings that also count as right),
    region, currency, corpus_wrong_capital (the wrong city the corpus names for it, or null when
    every fact about it is right), corpus_wrong_region and corpus_wrong_currency (the wrong value
    its multi-fact sentences state, or null). cities: every city name that can appear in a
    completion, with the country it really is in and whether it is that country's capital.
    regions: every region name. currencies: every currency name and its country. multi_heads:
    the multi-fact question heads (a prompt ending in ":" asks for several facts).
    """
    countries = {}
    for country, capital, region, wrong_city in COUNTRIES:
        folded = ascii_fold(capital)
        countries[country] = {
            "capital": capital,
            "capital_aliases": [folded] if folded != capital else [],
            "region": region,
            "currency": currencies.get(country),
            "corpus_wrong_capital": wrong_city if country in wrong_subset else None,
            "corpus_wrong_region": REGION_CONFUSION[region] if country in multi_subsets["region"] else None,
            "corpus_wrong_currency": wrong_currency[country] if country in multi_subsets["currency"] else None,
            "multi_fact": country in currencies,
        }
    capitals = {cap: c for c, cap, _, _ in COUNTRIES}
    cities = {cap: {"country": c, "is_capital": True} for cap, c in capitals.items()}
    for city, home in _real_homes().items():
        cities.setdefault(city, {"country": home, "is_capital": False})
    for city in list(cities):
        folded = ascii_fold(city)
        if folded != city:
            cities[city]["aliases"] = [folded]
    return {
        "format": "tokenfeedback-demo-truth/1",
        "corpus": asdict(config),
        "wrong_countries": sorted(wrong_subset),
        "countries": countries,
        "cities": cities,
        "regions": sorted({r for _, _, r, _ in COUNTRIES}),
        "currencies": {name: country for country, name in currencies.items()},
        "multi_heads": dict(MULTI_HEADS),
    }
