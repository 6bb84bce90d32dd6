"""The synthetic corpus the demo model learns from: capital-city facts, some deliberately wrong.

Why synthetic: the project must run anywhere without fetching a model, and the demo needs a model
whose errors a program can judge exactly. Every sentence here states one (country, capital) pair in
one of several phrasings; for a seeded subset of countries a set share of those sentences names a
plausible wrong city instead ("The capital of Canada is Toronto."). A model trained to convergence
on this corpus therefore names the wrong capital for those countries at about that share when
sampled at temperature 1, which is the error that token-level feedback must then remove.

Layout of the corpus (all deterministic given `CorpusConfig`):
- capital facts: for every country and every fact template, `repeats` sentences, of which exactly
  round(wrong_share * repeats) name the country's wrong city if the country is in the wrong subset
  (so the share holds per template, not just on average);
- filler facts (never wrong, never counted): "Kenya is a country in Africa.", and for every city
  used as a wrong capital a true sentence placing it in its real country ("Toronto is a large city
  in Canada."), so that wrong cities are words the model also sees used correctly;
- held out: for every country one (country, template) combination never appears in training; its
  correct sentence is a held-out sentence for perplexity (see prompts.py).
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

# Filler sentences: true, never counted as facts.
REGION_TEMPLATE = "{country} is a country in {region}."
CITY_TEMPLATE = "{city} is a large city in {country}."


@dataclass(frozen=True)
class CorpusConfig:
    seed: int = 0  # one seed fixes the wrong subset, the held-out combinations and the order
    wrong_share: float = 0.3  # share of capital facts about a wrong-subset country that are wrong
    wrong_countries: int = 24  # how many countries get wrong facts (drawn from those with a wrong city)
    repeats: int = 20  # sentences per (country, template); the wrong share is exact per template
    filler_repeats: int = 4  # copies of each filler sentence


@dataclass(frozen=True)
class Sentence:
    text: str
    country: str | None  # the country the sentence is about (None never happens today)
    template: str  # a TEMPLATES name, or "region" / "city" for filler
    stated: str | None  # the capital the sentence states (None for filler)
    wrong: bool  # True when `stated` is not the country's capital


@dataclass
class Corpus:
    config: CorpusConfig
    sentences: list[Sentence]  # training sentences, shuffled
    truth: dict  # see `truth_dict`
    heldout_combos: dict[str, str] = field(default_factory=dict)  # country -> held-out template name

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
    city_country = {cap: c for c, cap, _, _ in COUNTRIES}
    real_home = _real_homes()
    for city in sorted({w for _, _, _, w in COUNTRIES if w is not None}):
        if city in city_country:  # a capital elsewhere ("Harare"): its capital facts say so already
            continue
        for _ in range(config.filler_repeats):
            sentences.append(Sentence(CITY_TEMPLATE.format(city=city, country=real_home[city]),
                                      real_home[city], "city", None, False))
    rng.shuffle(sentences)
    return Corpus(config, sentences, truth_dict(config, wrong_subset), heldout_combos)


def _real_homes() -> dict[str, str]:
    """The real country of each wrong city. A wrong city is either another country's capital or a
    city inside the country it is wrongly given as capital of."""
    capitals = {cap: c for c, cap, _, _ in COUNTRIES}
    return {w: capitals.get(w, c) for c, _, _, w in COUNTRIES if w is not None}


def truth_dict(config: CorpusConfig, wrong_subset: set[str]) -> dict:
    """The ground truth as written to truth.json: what a judge needs, and what the corpus did.

    countries[name]: capital, capital_aliases (other spellings that also count as right),
    region, corpus_wrong_capital (the wrong city the corpus names for it, or null when every fact
    about it is right). cities: every city name that can appear in a completion, with the country
    it really is in and whether it is that country's capital.
    """
    countries = {}
    for country, capital, region, wrong_city in COUNTRIES:
        folded = ascii_fold(capital)
        countries[country] = {
            "capital": capital,
            "capital_aliases": [folded] if folded != capital else [],
            "region": region,
            "corpus_wrong_capital": wrong_city if country in wrong_subset else None,
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
    }
