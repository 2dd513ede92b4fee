"""A synthetic bioS world (after Allen-Zhu & Li, "Physics of Language Models 3.1/3.3").

Invented people, each with five attributes drawn from fixed lists: birth date, birth city,
university, major and employer. A person with `e` exposures appears in exactly `e` biography
documents; every biography states all five attributes, each sentence from a randomly chosen
training template with the full name, in a random sentence order (the "permutation" and "fullname"
augmentations that let knowledge be extracted later). Probes use one held-out template per
attribute, e.g. "The birthplace of Aurelia Quinn Marwick is the city of" -> "Lisbon".

Since the names are invented, no fact can leak from any other source: this is the world for
capacity studies (bits per parameter) and for clean frequency curves. Exposures come from the same
Zipf law as the real facts (`hiermem.data.facts.assign_exposures`). One person is one fact
document family: the five facts of a person share the fact_id ``bio:<name-slug>``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from hiermem.data.facts import Fact, Relation, assign_exposures, relation_rng
from hiermem.data.textutil import slug

FIRST_NAMES = """Aurelia Bastian Cosima Dorian Elowen Fenwick Galen Hesper Isolde Jasper Kestrel Linnea
Magnus Nerys Oriel Percival Quilla Rowan Saoirse Tobias Ulric Verity Wendell Xanthe Yorick Zinnia
Anselm Briony Caspian Delphine Emrys Fiora Gideon Honora Ignatius Juniper Leander Marisol Nico
Ottoline Peregrine Rosalind Silas Tamsin Valentin Wilhelmina Alaric Beatrix Cormac Dagny Evander
Florian Greer Hollis Imogen Jonas Katya Lucian Mireille Niamh Orson Philippa Quentin Rhiannon
Soren Thea Ulla Vaughn Winslow Ysolde Zephyr Ambrose Celestine Darius Esme Felix Ginevra Horatio
Ines Julian Kit Lorcan Maeve Nils Odile Pascal Romilly Stellan Tilda Ursula Vesper Wren""".split()

MIDDLE_NAMES = """Quinn Rey Sage Lark Blaise Ellis Arden Noel Reid Shea Vale Brook Emery Hale Ivo Jude
Kai Lane Marlowe Nash Oakley Pryce Rhys Sloane Tate Umber West Yale Zane Avery Bram Cade Darcy Eden
Faye Gray Hart Ives Jory Knox""".split()

LAST_NAMES = """Marwick Thorncastle Abernethy Blackwood Carrow Dunmore Elsworth Fairbairn Garroway
Halloran Ingleby Jessamy Kilbride Lockhart Merriweather Northcott Ollerton Pemberton Quarles
Ravensworth Sallow Tregarthen Underhill Vantongeren Whitlock Yelverton Ashcombe Brackenbury
Cardew Drumheller Everleigh Fothergill Greystoke Hawthorne Islington Jardine Kettleby Langstaff
Montrose Nettleship Oglethorpe Penhallow Quennell Rosenthal Stroud Tolliver Upjohn Valcourt
Winterbourne Wyndham Ackroyd Barraclough Chisholm Delacroix Eskdale Farquhar Gillespie Holloway
Inchcape Jennings Kinsella Lindqvist Mallory Nightingale Ormsby Prendergast Redgrave Sutcliffe
Trelawney Urquhart Verlaine Wetherby Zabriskie Ainsley Bellweather Calloway Devereux Ellingham
Fenwright Gatsworth Harrowgate Ivensdale Jolliffe Kingsmere Loveridge Mortimer Nancarrow
Oddfellow Pendragon Quimby Rutherford Stirling Thistlewood Umfreville Vickery Woolcott""".split()

BIRTH_CITIES = """Lisbon Porto Valencia Seville Bordeaux Lyon Marseille Nantes Antwerp Ghent Utrecht
Rotterdam Hamburg Leipzig Dresden Munich Salzburg Graz Zurich Basel Geneva Turin Bologna Naples
Palermo Florence Ljubljana Zagreb Split Sarajevo Belgrade Sofia Bucharest Krakow Gdansk Wroclaw
Prague Brno Bratislava Budapest Vilnius Riga Tallinn Helsinki Tampere Uppsala Gothenburg Bergen
Trondheim Aarhus Odense Reykjavik Dublin Cork Galway Edinburgh Glasgow Cardiff Bristol Leeds York
Norwich Montreal Quebec Halifax Winnipeg Calgary Vancouver Seattle Portland Denver Austin Houston
Boston Chicago Detroit Memphis Nashville Savannah Atlanta Tucson Albuquerque Honolulu Anchorage
Oaxaca Puebla Guadalajara Medellin Cusco Valparaiso Mendoza Montevideo Recife Salvador Curitiba
Dakar Accra Kumasi Nairobi Mombasa Kampala Kigali Lusaka Harare Durban Windhoek Casablanca Tunis
Alexandria Beirut Amman Tbilisi Yerevan Baku Tashkent Samarkand Almaty Lahore Jaipur Pune Kochi
Chennai Colombo Kathmandu Dhaka Yangon Mandalay Hanoi Hue Manila Cebu Surabaya Bandung Penang Osaka
Kyoto Sapporo Nagoya Busan Incheon Taipei Kaohsiung Chengdu Xiamen Harbin Ulaanbaatar Perth
Adelaide Brisbane Hobart Auckland Wellington Christchurch Suva""".split()

UNIVERSITIES = [f"{p} {k}" for p, k in zip(
    """Harrowgate Kestrel Marlowe Penrose Ashford Brightwater Caldmoor Dunhaven Eastmere Falkirk
    Glenrowan Highcliff Ironbridge Juniper Kingsbridge Larchmont Meadowvale Northgate Oakhurst
    Pinecrest Queensbury Riverside Stonebridge Thornbury Upton Valemont Westbrook Yarrow Zenith
    Amberley Bellhaven Coldwater Driftwood Elmstead Foxglove Greenhollow Hartwell Ivybridge""".split(),
    ["University", "Institute of Technology", "College", "State University"] * 10)]

MAJORS = sorted({m for m in """Mathematics|Physics|Chemistry|Biology|Astronomy|Geology|Oceanography|
Meteorology|Ecology|Genetics|Neuroscience|Biochemistry|Microbiology|Botany|Zoology|Anthropology|
Archaeology|Linguistics|Philosophy|History|Economics|Sociology|Psychology|Architecture|Musicology|
Theology|Statistics|Accounting|Finance|Marketing|Journalism|Law|Medicine|Nursing|Pharmacy|
Dentistry|Agronomy|Forestry|Cartography|Metallurgy|Robotics|Cryptography|Epidemiology|
Veterinary Science|Civil Engineering|Mechanical Engineering|Electrical Engineering|
Computer Science|Data Science|Materials Science|Political Science|Art History|Classical Studies|
Urban Planning""".replace("\n", "").split("|")})

EMPLOYERS = [f"{a} {b}" for a, b in zip(
    """Northwind Bluefjord Copperleaf Duskfield Emberline Frostgate Goldcrest Hollowpine Ironvale
    Jadestone Kitewing Lumenford Moonreach Nettlebrook Orchardia Pebblecove Quicksilver Redmarsh
    Saltmeadow Tidewater Umberlight Vantage Willowmere Xylem Yellowtail Zephyrine Arclight
    Brambleton Cinderfall Driftmark Evergrove Flintlock Graniteworks Harborview Inkwell
    Juniperline Keystone Lanternfield Mistral Nimbus""".split(),
    ["Analytics", "Shipping", "Pharmaceuticals", "Robotics", "Media", "Foods", "Energy",
     "Aerospace", "Textiles", "Insurance"] * 4)]

BIO_RELATIONS: dict[str, Relation] = {r.name: r for r in (
    Relation("bio_birth_date", "synthetic", "bio",
             ("{subject} was born on {answer}.",
              "{subject} came into the world on {answer}.",
              "The birth of {subject} took place on {answer}.",
              "{subject} celebrates a birthday each year, having been born on {answer}."),
             "The date of birth of {subject} is", lambda: []),
    Relation("bio_birth_city", "synthetic", "bio",
             ("{subject} was born in {answer}.",
              "{subject} spent early years in {answer}.",
              "{subject}'s hometown is {answer}.",
              "{subject} grew up in {answer}."),
             "The birthplace of {subject} is the city of", lambda: []),
    Relation("bio_university", "synthetic", "bio",
             ("{subject} studied at {answer}.",
              "{subject} graduated from {answer}.",
              "{subject} received an education at {answer}.",
              "{subject} attended {answer}."),
             "The university that {subject} went to is", lambda: []),
    Relation("bio_major", "synthetic", "bio",
             ("{subject} majored in {answer}.",
              "{subject} earned a degree in {answer}.",
              "{subject} chose {answer} as a field of study.",
              "{subject} focused on {answer} in college."),
             "The subject that {subject} specialised in at university is", lambda: []),
    Relation("bio_employer", "synthetic", "bio",
             ("{subject} worked for {answer}.",
              "{subject} was employed by {answer}.",
              "{subject} built a career at {answer}.",
              "{subject} had a job at {answer}."),
             "The company that employed {subject} is", lambda: []),
)}


@dataclass(frozen=True)
class Person:
    name: str
    attributes: dict[str, str]  # bio relation name -> answer

    @property
    def fact_id(self) -> str:
        return f"bio:{slug(self.name)}"

    def facts(self) -> list[Fact]:
        return [Fact(self.fact_id, rel, self.name, ans) for rel, ans in self.attributes.items()]


def max_people() -> int:
    return len(FIRST_NAMES) * len(MIDDLE_NAMES) * len(LAST_NAMES)


def invent_people(n: int, seed: int) -> list[Person]:
    """`n` people with distinct invented full names and random attributes (deterministic)."""
    if not 0 <= n <= max_people():
        raise ValueError(f"synthetic_people must be in [0, {max_people()}] (the number of distinct "
                         f"invented names), got {n}")
    rng = relation_rng(seed, "bioS-people")
    codes = rng.choice(max_people(), size=n, replace=False)
    start, days = dt.date(1900, 1, 1), (dt.date(1999, 12, 31) - dt.date(1900, 1, 1)).days
    people = []
    for code in codes:
        code, last = divmod(int(code), len(LAST_NAMES))
        first, middle = divmod(code, len(MIDDLE_NAMES))
        born = start + dt.timedelta(days=int(rng.integers(days + 1)))
        people.append(Person(f"{FIRST_NAMES[first]} {MIDDLE_NAMES[middle]} {LAST_NAMES[last]}", {
            "bio_birth_date": f"{born:%B} {born.day}, {born.year}",
            "bio_birth_city": BIRTH_CITIES[rng.integers(len(BIRTH_CITIES))],
            "bio_university": UNIVERSITIES[rng.integers(len(UNIVERSITIES))],
            "bio_major": MAJORS[rng.integers(len(MAJORS))],
            "bio_employer": EMPLOYERS[rng.integers(len(EMPLOYERS))],
        }))
    return people


def biography(person: Person, rng: np.random.Generator) -> str:
    """One biography: every attribute once, random template per attribute, random order."""
    sentences = [BIO_RELATIONS[rel].train_templates[rng.integers(len(BIO_RELATIONS[rel].train_templates))]
                 .format(subject=person.name, answer=answer)
                 for rel, answer in person.attributes.items()]
    return " ".join(sentences[i] for i in rng.permutation(len(sentences)))


def synthetic_world(n_people: int, *, seed: int, law: str, exponent: float, max_exposures: int,
                    min_exposures: int) -> tuple[list[Person], np.ndarray, list[dict]]:
    """People, their exposure counts, and their biography documents (source 'bioS', topic 'bio')."""
    people = invent_people(n_people, seed)
    exposures = assign_exposures(len(people), law=law, exponent=exponent,
                                 max_exposures=max_exposures, min_exposures=min_exposures,
                                 rng=relation_rng(seed, "bioS-exposures"))
    rng = relation_rng(seed, "bioS-documents")
    docs = [{"source": "bioS", "title": p.name, "text": biography(p, rng), "topic": "bio",
             "fact_id": p.fact_id, "occurrence": k}
            for p, e in zip(people, exposures) for k in range(int(e))]
    return people, exposures, docs
