"""Writes the bundled sample corpus (data/sample/*.jsonl): procedurally generated, so it is ours to ship.

Small but varied and learnable: short stories from templates, arithmetic, key-value facts, Python snippets and
some Chinese sentences, plus a chat set for SFT. Deterministic: `python data/sample/make_sample.py` rewrites the
same files.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NAMES = ["Ada", "Bo", "Cyra", "Dev", "Elin", "Farid", "Gus", "Hana", "Ivo", "June", "Kai", "Lena", "Milo", "Nora"]
ANIMALS = ["cat", "dog", "fox", "owl", "horse", "rabbit", "crow", "goat", "otter", "deer"]
PLACES = ["the river", "the old mill", "the market", "the hill", "the forest", "the harbour", "the library", "the garden"]
THINGS = ["a red kite", "a lantern", "a map", "a loaf of bread", "a silver key", "a blue book", "a small boat", "a drum"]
FEEL = ["happy", "tired", "curious", "brave", "quiet", "hungry", "proud", "worried"]
COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
ZH = ["今天天气很好，我们去公园散步。", "小猫在院子里睡觉。", "他每天早上喝一杯茶。", "这本书很有意思，我读了两遍。",
      "我们一起学习数学和语言。", "河边有一座古老的磨坊。", "她带着灯笼走进森林。", "市场上有很多新鲜的水果。"]


def story(rng):
    who, pet, place, thing = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(THINGS)
    lines = [f"{who} had a {rng.choice(COLORS)} {pet}.",
             f"One morning {who} and the {pet} walked to {place}.",
             f"There they found {thing}."]
    for _ in range(rng.randint(1, 4)):
        lines.append(rng.choice([
            f"The {pet} was {rng.choice(FEEL)}, so {who} sat down and waited.",
            f"{who} picked up {thing} and looked at it for a long time.",
            f"A {rng.choice(ANIMALS)} came from {rng.choice(PLACES)} and said hello.",
            f"They walked on until the sun was low over {rng.choice(PLACES)}.",
        ]))
    lines.append(f"In the evening {who} went home with {thing}, and the {pet} slept by the fire.")
    return " ".join(lines)


def arithmetic(rng):
    rows = []
    for _ in range(rng.randint(4, 12)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        rows.append(f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}")
    return "\n".join(rows)


def facts(rng):
    who = rng.sample(NAMES, 4)
    rows = [f"{n} likes the colour {rng.choice(COLORS)} and keeps a {rng.choice(ANIMALS)}." for n in who]
    rows.append(f"Question: who keeps the animal named first? Answer: {who[0]}.")
    return "\n".join(rows)


def code(rng):
    name, k = rng.choice(["total", "count", "scale", "shift", "mix"]), rng.randint(2, 9)
    return (f"def {name}_{k}(values):\n    \"\"\"Return the {name} of values with factor {k}.\"\"\"\n"
            f"    result = 0\n    for v in values:\n        result += v * {k}\n    return result\n\n\n"
            f"print({name}_{k}([{', '.join(str(rng.randint(0, 9)) for _ in range(4))}]))\n")


def chinese(rng):
    return "".join(rng.choice(ZH) for _ in range(rng.randint(3, 8)))


def chat(rng):
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    who, pet = rng.choice(NAMES), rng.choice(ANIMALS)
    pairs = rng.choice([
        [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.")],
        [(f"Tell me a short story about {who}.", story(rng))],
        [(f"Name an animal that is {rng.choice(COLORS)}.", f"A {pet} can be that colour."),
         ("Another one?", f"A {rng.choice(ANIMALS)}.")],
    ])
    msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
    for q, ans in pairs:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
    return {"messages": msgs}


def write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def corpus(rng, n):
    makers = [story] * 5 + [arithmetic, facts, code, chinese]
    return [{"text": rng.choice(makers)(rng)} for _ in range(n)]


if __name__ == "__main__":
    write(HERE / "train.jsonl", corpus(random.Random(0), 1100))
    write(HERE / "val.jsonl", corpus(random.Random(1), 120))
    write(HERE / "chat_train.jsonl", [chat(random.Random(10 + i)) for i in range(600)])
    write(HERE / "chat_val.jsonl", [chat(random.Random(100000 + i)) for i in range(60)])
