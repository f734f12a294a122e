"""Short knowledge questions for the forgetting check of `real_model.reproduce` (the paper's MMLU/ARC-C stand-in).

Candidates are generated here (capitals, opposites, simple facts, each asking for one word); the experiment keeps
those the base model answers right, so the base scores 100% on the kept set by construction and every arm's score
after training measures what it lost. An answer counts when an acceptable word appears anywhere in the greedy reply.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from benchmarks.real_model.tasks import autocast

_ONE_WORD = " Answer with one word."
_CAPITALS = (
    "France:Paris Germany:Berlin Italy:Rome Spain:Madrid Japan:Tokyo China:Beijing Russia:Moscow Egypt:Cairo "
    "England:London Portugal:Lisbon Greece:Athens Austria:Vienna Norway:Oslo Sweden:Stockholm Finland:Helsinki "
    "Denmark:Copenhagen Poland:Warsaw Hungary:Budapest Ireland:Dublin Belgium:Brussels Netherlands:Amsterdam "
    "Canada:Ottawa Mexico:Mexico_City Argentina:Buenos_Aires Peru:Lima Chile:Santiago Colombia:Bogota "
    "Venezuela:Caracas Cuba:Havana Kenya:Nairobi Thailand:Bangkok Vietnam:Hanoi Indonesia:Jakarta "
    "Philippines:Manila India:Delhi Iran:Tehran Iraq:Baghdad Turkey:Ankara Syria:Damascus Lebanon:Beirut "
    "Israel:Jerusalem Australia:Canberra Switzerland:Bern Czechia:Prague Romania:Bucharest Bulgaria:Sofia "
    "Serbia:Belgrade Ukraine:Kyiv Scotland:Edinburgh Wales:Cardiff Iceland:Reykjavik Nigeria:Abuja "
    "Ethiopia:Addis_Ababa Morocco:Rabat Brazil:Brasilia Pakistan:Islamabad Afghanistan:Kabul Nepal:Kathmandu "
    "Mongolia:Ulaanbaatar Jamaica:Kingston Singapore:Singapore"
)
_OPPOSITES = (
    "hot:cold big:small up:down fast:slow happy:sad light:dark day:night open:closed wet:dry old:young hard:soft "
    "rich:poor strong:weak full:empty high:low early:late good:bad long:short thick:thin loud:quiet "
    "heavy:light inside:outside clean:dirty true:false win:lose left:right push:pull black:white north:south "
    "east:west first:last top:bottom love:hate yes:no buy:sell front:back near:far tall:short easy:difficult "
    "start:finish alive:dead cheap:expensive sharp:dull sweet:sour always:never question:answer friend:enemy "
    "arrive:leave asleep:awake begin:end"
)
_FACTS = (
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("What color is snow?", "white"),
    ("What color is a banana?", "yellow"),
    ("What color is blood?", "red"),
    ("What color is coal?", "black"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("What color do you get by mixing red and white?", "pink"),
    ("What is the largest planet in the solar system?", "jupiter"),
    ("Which planet is known as the red planet?", "mars"),
    ("What planet do we live on?", "earth"),
    ("What star is at the center of our solar system?", "sun"),
    ("What is the closest planet to the sun?", "mercury"),
    ("What is frozen water called?", "ice"),
    ("What gas do humans need to breathe?", "oxygen"),
    ("What is the largest ocean on Earth?", "pacific"),
    ("What is the largest mammal?", "whale"),
    ("What is the tallest animal?", "giraffe"),
    ("What animal is known as the king of the jungle?", "lion"),
    ("What animal says moo?", "cow"),
    ("What animal barks?", "dog"),
    ("What animal says meow?", "cat"),
    ("What animal has a trunk?", "elephant"),
    ("What insect makes honey?", "bee"),
    ("What do bees make?", "honey"),
    ("What do cows produce that people drink?", "milk"),
    ("What do you call a baby dog?", "puppy"),
    ("What do you call a baby cat?", "kitten"),
    ("What do caterpillars turn into?", "butterfly"),
    ("What bird is a symbol of peace?", "dove"),
    ("What organ pumps blood through the body?", "heart"),
    ("What organ do humans think with?", "brain"),
    ("What do we use to see?", "eyes"),
    ("What do we use to hear?", "ears"),
    ("What is the opposite of north?", "south"),
    ("What season comes after winter?", "spring"),
    ("What season comes after summer?", "autumn fall"),
    ("What is the first month of the year?", "january"),
    ("What is the last month of the year?", "december"),
    ("What day comes after Monday?", "tuesday"),
    ("What day comes after Friday?", "saturday"),
    ("What day comes before Sunday?", "saturday"),
    ("What is the main language spoken in France?", "french"),
    ("What is the main language spoken in Spain?", "spanish"),
    ("What is the main language spoken in Germany?", "german"),
    ("What is the main language spoken in Italy?", "italian"),
    ("What is the main language spoken in Japan?", "japanese"),
    ("What is the main language spoken in Brazil?", "portuguese"),
    ("What is the main language spoken in China?", "chinese mandarin"),
    ("What is the main language spoken in Russia?", "russian"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("Who painted the Mona Lisa?", "leonardo vinci"),
    ("Who developed the theory of relativity?", "einstein"),
    ("What is the chemical symbol for water?", "h2o"),
    ("What is the chemical symbol for gold?", "au"),
    ("What is the chemical symbol for oxygen?", "o"),
    ("What metal is liquid at room temperature?", "mercury"),
    ("What is the hardest natural substance?", "diamond"),
    ("What is the currency of the United States?", "dollar"),
    ("What is the currency of Japan?", "yen"),
    ("What is the currency of the United Kingdom?", "pound"),
    ("What is the currency of Europe?", "euro"),
    ("What is the longest river in Africa?", "nile"),
    ("What is the largest desert in Africa?", "sahara"),
    ("What is the tallest mountain in the world?", "everest"),
    ("On which continent is Egypt?", "africa"),
    ("On which continent is France?", "europe"),
    ("On which continent is Japan?", "asia"),
    ("On which continent is Brazil?", "america"),
    ("What do plants need from the sun to grow?", "light sunlight"),
    ("What is the plural of mouse?", "mice"),
    ("What is the plural of child?", "children"),
    ("What is the plural of foot?", "feet"),
    ("What is the plural of tooth?", "teeth"),
    ("What is the plural of man?", "men"),
    ("What is the past tense of go?", "went"),
    ("What is the past tense of eat?", "ate"),
    ("What is the past tense of run?", "ran"),
    ("What is the past tense of see?", "saw"),
    ("What shape has three sides?", "triangle"),
    ("What shape has four equal sides?", "square"),
    ("What shape is a ball?", "sphere round circle"),
    ("What do you call a shape with eight sides?", "octagon"),
    ("What fruit keeps the doctor away?", "apple"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
    ("How many days are in a week?", "7 seven"),
    ("How many months are in a year?", "12 twelve"),
    ("How many legs does a spider have?", "8 eight"),
    ("How many legs does a dog have?", "4 four"),
    ("How many hours are in a day?", "24 twenty-four"),
    ("How many minutes are in an hour?", "60 sixty"),
    ("How many continents are there?", "7 seven"),
    ("How many sides does a hexagon have?", "6 six"),
    ("What sport is played at Wimbledon?", "tennis"),
    ("What instrument has 88 keys?", "piano"),
    ("What do you call the person who flies a plane?", "pilot"),
    ("What do you call a doctor for animals?", "veterinarian vet"),
    ("What do you call a person who teaches in a school?", "teacher"),
    ("What vehicle travels on rails?", "train"),
    ("What do you use to cut paper?", "scissors"),
)


def knowledge_candidates() -> list[tuple[str, list[str]]]:
    """(question, acceptable answers) pairs: capitals, opposites and simple facts (before filtering on the base)."""
    out: list[tuple[str, list[str]]] = []
    for item in _CAPITALS.split():
        country, city = item.split(":")
        out.append((f"What is the capital of {country}?{_ONE_WORD}", [city.replace("_", " ").lower()]))
    for item in _OPPOSITES.split():
        word, opposite = item.split(":")
        out.append((f"What is the opposite of '{word}'?{_ONE_WORD}", [opposite]))
    out += [(f"{q}{_ONE_WORD}", a.split()) for q, a in _FACTS]
    return out


KNOWLEDGE_CANDIDATES = knowledge_candidates()


def knowledge_match(generation: str, answers: Sequence[str]) -> bool:
    """True when one of `answers` appears as a whole word (case-insensitive) in the generation."""
    text = generation.lower()
    return any(re.search(rf"(?<![a-z0-9]){re.escape(a)}(?![a-z0-9])", text) for a in answers)


def knowledge_eval(
    model, tokenizer, questions: Sequence[tuple[str, Sequence[str]]], *, device="cpu", amp=None, max_new_tokens=12
) -> dict[str, Any]:
    """Greedy answers to `questions`; returns {"correct": list[bool], "accuracy": float, "generations": list[str]}."""
    from alps_trl.recipes.generation_eval import generate_answers

    with autocast(device, amp):
        result = generate_answers(
            model,
            tokenizer,
            [[{"role": "user", "content": q}] for q, _ in questions],
            [a[0] for _, a in questions],
            max_new_tokens=max_new_tokens,
            batch_size=64,
            disable_progress=True,
        )
    correct = [knowledge_match(g, a) for g, (_, a) in zip(result.generations, questions)]
    return {"correct": correct, "accuracy": sum(correct) / max(len(correct), 1), "generations": result.generations}
