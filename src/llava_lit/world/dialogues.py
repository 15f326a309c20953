"""Text of the miniature world, derived from scene ground truth: captions, instructions, questions, answers.

Mirrors LLaVA's data: stage-1 caption records, stage-2 instruction records of the paper's three response
types (multi-turn conversation, detailed description, complex reasoning) plus text-only records, the held-out
evaluation questions with their gold keys, and the text corpus the tiny LLaMA and tokenizer are trained on.
Every answer is a short sentence containing its key word, so `score.py` can check it strictly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llava_lit.constants import IMAGE_TOKEN
from llava_lit.conversation import VICUNA_SYSTEM
from llava_lit.world.config import WorldConfig
from llava_lit.world.scenes import SLOTS, Scene, SceneObject

SLOT_ORDER = ["top", "left", "center", "right", "bottom"]
"""Reading order in which captions and descriptions list a scene's objects."""

POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

BRIEF_PROMPTS = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short caption of the picture.",
    "Summarize the visual content of the image.",
    "What is in this picture?",
]
"""Stage-1 instructions (the `plain` template drops them, other templates keep them)."""

DETAIL_PROMPTS = [
    "Describe the image in detail.",
    "Give a detailed description of the picture.",
    "What do you see in this image? Describe it thoroughly.",
    "Explain the contents of the image in detail.",
]

CONVERSATION_TYPES = ["color", "shape", "count", "exist", "position"]
"""Question types of multi-turn conversations (the work item's required forms)."""

REASONING_TYPES = ["closest", "remove"]
"""Complex-reasoning question types."""

QUESTION_TYPES = CONVERSATION_TYPES + REASONING_TYPES
"""Every scored question type, in report order."""


@dataclass(frozen=True)
class QA:
    """One question about a scene with its gold answer."""

    category: str
    """Question type, one of `QUESTION_TYPES`."""

    question: str
    """The question text (without `<image>`)."""

    answer: str
    """The gold answer: a short sentence containing `key`."""

    key: str
    """What a correct answer must name: a color, shape, digit, yes/no, slot, or "color shape"."""

    candidates: tuple[str, ...]
    """Every key a guess could name for this question (its size gives the chance level)."""


def article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(obj: SceneObject, with_size: bool = False) -> str:
    """'a red circle' / 'an orange small square' style phrase."""
    words = ([obj.size] if with_size else []) + [obj.color, obj.shape]
    return f"{article(words[0])} {' '.join(words)}"


def ordered(scene: Scene) -> list[SceneObject]:
    """The scene's objects in reading order (`SLOT_ORDER`)."""
    return sorted(scene.objects, key=lambda o: SLOT_ORDER.index(o.position))


def join_words(items: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


CAPTION_FORMS = (
    "{a} {color} {shape} {where}",
    "{where} {a} {color} {shape}",
    "{a_shape} {shape} in {color} {where}",
    "{where} {a_shape} {shape} in {color}",
)
"""Word orders of an object in a caption; each attribute leads in one of them and follows the others in another.

The LM pretraining text draws every caption's order from all four, so the tiny LLaMA knows that any attribute
may come first; with one order only ("a red circle on the left") stage 2 rarely learned to find an object by
its shape or say where it is. Stage-1 captions use the first order (`WorldConfig.align_mixed_orders`): aligned
to one phrase form, the projector's object tokens read like the phrase a question names; with verdict-first
existence answers stage 2 learned "Is there a red square?" in 2 of 3 runs, never with stage 1 on all four
(`docs/benchmarks.md`).
"""


def object_phrase(color: str, shape: str, position: str, form: int = 0) -> str:
    """One object as captions name it, e.g. 'a red circle on the left' (form 0) or 'a circle in red on the left'."""
    return CAPTION_FORMS[form].format(
        a=article(color), color=color, a_shape=article(shape), shape=shape, where=POSITION_PHRASES[position]
    )


def caption(scene: Scene, form: int = 0) -> str:
    """Stage-1 caption, e.g. 'a red circle on the left and a blue square on the right' (form 0)."""
    return join_words([object_phrase(o.color, o.shape, o.position, form) for o in ordered(scene)])


def detailed_description(scene: Scene) -> str:
    """Several sentences: count, background, then each object with size, color, shape and position."""
    n = len(scene.objects)
    head = f"The image shows {n} {'shape' if n == 1 else 'shapes'} on a {scene.background} background."
    parts = [
        f"There is {noun_phrase(o, with_size=True)} {POSITION_PHRASES[o.position]}." for o in ordered(scene)
    ]
    return " ".join([head, *parts])


def count_sentence(n: int, verb_phrase: str = "") -> str:
    """'There are 3 shapes.' style answer with the count as a digit."""
    return f"There {'is' if n == 1 else 'are'} {n} {'shape' if n == 1 else 'shapes'}{verb_phrase}."


def conversation_qas(scene: Scene, cfg: WorldConfig, rng: random.Random) -> dict[str, list[QA]]:
    """Every unambiguous question of each conversation type the scene supports."""
    colors, shapes = tuple(sorted(cfg.palette)), tuple(cfg.shapes)
    shape_counts = {s: sum(o.shape == s for o in scene.objects) for s in cfg.shapes}
    out: dict[str, list[QA]] = {t: [] for t in CONVERSATION_TYPES}
    for o in scene.objects:
        if shape_counts[o.shape] == 1:  # "the circle" must name one object
            out["color"].append(
                QA("color", f"What color is the {o.shape}?", f"The {o.shape} is {o.color}.", o.color, colors)
            )
        out["shape"].append(
            QA(
                "shape",
                f"What shape is the {o.color} object?",
                f"The {o.color} object is a {o.shape}.",
                o.shape,
                shapes,
            )
        )
        out["position"].append(
            QA(
                "position",
                f"Where is the {o.color} {o.shape}?",
                f"The {o.color} {o.shape} is {POSITION_PHRASES[o.position]}.",
                o.position,
                tuple(SLOTS),
            )
        )
    n = len(scene.objects)
    counts = tuple(str(i) for i in range(1, cfg.max_objects + 1))
    out["count"].append(QA("count", "How many shapes are there?", count_sentence(n), str(n), counts))
    out["exist"].append(exist_qa(scene, cfg, rng))
    return out


def exist_qa(scene: Scene, cfg: WorldConfig, rng: random.Random) -> QA:
    """'Is there a {color} {shape}?': 40 % yes; 40 % no for a shape the scene holds, in a color none of its objects
    of that shape has; 20 % no for a shape the scene lacks (when there is one).

    The answer first says the color of each object of the asked shape, then the verdict ("The circle is blue,
    so no."; "The squares are red and green, so yes."; "There is no triangle, so no."). Finding objects by
    their shape is the look-up stage 2 learned least reliably ("What color is the circle?"), and this answer
    teaches it in every existence question; the verdict then compares the color just named with the asked one.
    With a quarter of the questions asking for a present shape in another color, "yes whenever the shape is
    there" scored 75 %, and runs that learned the look-up still answered "The square is blue, so yes." to "Is
    there a yellow square?" in half of those cases; at 40 % that shortcut is worth 60 % and the verdict follows
    the named colors in every answer (docs/benchmarks.md). Answers that open with the verdict ("No, there is no
    red circle.") are learned in 2 of 6 runs. The comparison itself is practised on text too
    (`exist_reading_records`).
    """
    present = {(o.color, o.shape) for o in scene.objects}
    draw = rng.random()
    if draw < 0.4:
        color, shape = rng.choice(sorted(present))
        key = "yes"
    else:
        absent = [(c, s) for c in sorted(cfg.palette) for s in cfg.shapes if (c, s) not in present]
        shapes_here = {o.shape for o in scene.objects}
        same_shape = [(c, s) for c, s in absent if s in shapes_here]
        other_shape = [(c, s) for c, s in absent if s not in shapes_here]
        color, shape = rng.choice(
            same_shape if (draw < 0.8 and same_shape) or not other_shape else other_shape
        )
        key = "no"
    colors = [o.color for o in ordered(scene) if o.shape == shape]
    if not colors:
        seen = f"There is no {shape}"
    elif len(colors) == 1:
        seen = f"The {shape} is {colors[0]}"
    else:
        seen = f"The {shape}s are {join_words(colors)}"
    return QA(
        "exist", f"Is there {article(color)} {color} {shape}?", f"{seen}, so {key}.", key, ("yes", "no")
    )


def reasoning_qas(scene: Scene, cfg: WorldConfig) -> dict[str, list[QA]]:
    """Complex-reasoning questions: which object is closest to a side; how many remain if one is removed."""
    out: dict[str, list[QA]] = {t: [] for t in REASONING_TYPES}
    objs = scene.objects
    if len(objs) >= 2:
        names = tuple(f"{o.color} {o.shape}" for o in objs)
        for side, (axis, sign) in {
            "top": (1, 1),
            "bottom": (1, -1),
            "left": (0, 1),
            "right": (0, -1),
        }.items():
            # Distance to the side by slot centre; asked only when one object is strictly closest.
            dist = [sign * SLOTS[o.position][axis] for o in objs]
            best = min(dist)
            if dist.count(best) != 1:
                continue
            o = objs[dist.index(best)]
            out["closest"].append(
                QA(
                    "closest",
                    f"Which shape is closest to the {side}?",
                    f"The {o.color} {o.shape} is closest to the {side}.",
                    f"{o.color} {o.shape}",
                    names,
                )
            )
    remaining = tuple(str(i) for i in range(cfg.max_objects))
    for o in objs:
        left = len(objs) - 1
        out["remove"].append(
            QA(
                "remove",
                f"If the {o.color} shape were removed, how many shapes would remain?",
                f"Without the {o.color} {o.shape}, {left} {'shape' if left == 1 else 'shapes'} would remain.",
                str(left),
                remaining,
            )
        )
    return out


def all_qas(scene: Scene, cfg: WorldConfig, rng: random.Random) -> dict[str, list[QA]]:
    """Conversation and reasoning questions of one scene, by type."""
    return {**conversation_qas(scene, cfg, rng), **reasoning_qas(scene, cfg)}


def _turns(qas: list[QA], first_prefix: str) -> list[dict]:
    turns = []
    for i, qa in enumerate(qas):
        turns.append({"from": "human", "value": (first_prefix if i == 0 else "") + qa.question})
        turns.append({"from": "gpt", "value": qa.answer})
    return turns


def align_record(scene: Scene, image: str, rng: random.Random, mixed_orders: bool = False) -> dict:
    """Stage-1 LLaVA record: a brief-description instruction and the caption, in the first `CAPTION_FORMS` order
    or, with `mixed_orders`, a random one.

    The caption starts on a new line. The `plain` template puts it right after the image, and the text after an
    image is tokenized as a text of its own (the official `tokenizer_image_token`), so a caption starting with
    "a" would begin with the piece `▁a`, the way every caption document of the LM pretraining begins: the
    frozen LLM then predicts much of the caption from its prior (stage-1 loss 0.92-0.95 against 1.22) and the
    projector aligns worse (held-out 79.7 / 92.7 / 90.1 % in three batch orders). On a new line the image is
    followed by the same `▁`, newline as in every stage-2 question, and the three orders score 92.4 / 90.7 /
    94.9 % (docs/benchmarks.md).
    """
    prompt = rng.choice(BRIEF_PROMPTS)
    form = rng.randrange(len(CAPTION_FORMS))  # drawn either way, so the setting leaves every later draw alone
    return {
        "id": f"align-{scene.scene_id}",
        "image": image,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
            {"from": "gpt", "value": "\n" + caption(scene, form if mixed_orders else 0)},
        ],
    }


def same_shape_position_qas(scene: Scene, position_qas: list[QA]) -> list[QA]:
    """The position questions of every object that shares its shape with another object of the scene.

    "Where is the green circle?" beside a blue circle can only be answered by the color; with one circle the shape
    alone finds it. Without these questions stage 2 learns that shortcut: held-out position questions score
    82-86 % where the asked shape is unique and 41-55 % where it is shared, nearly every such miss naming the
    slot of the other object of that shape. Asking about each object of the shared shape in the same
    conversation makes the color the only way to answer both: 86-90 % on shared shapes, 93 and 97 % overall, in
    two batch orders (docs/benchmarks.md). It draws no random numbers, so the other records do not depend on it.
    """
    shared = {o.shape for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) > 1}
    by_slot = {qa.key: qa for qa in position_qas}  # one object per slot
    return [by_slot[o.position] for o in ordered(scene) if o.shape in shared]


def finetune_records(scene: Scene, image: str, cfg: WorldConfig, rng: random.Random) -> list[dict]:
    """Stage-2 LLaVA records of one scene: a conversation, maybe a detailed description and a reasoning turn."""
    prefix = f"{IMAGE_TOKEN}\n"
    conv = conversation_qas(scene, cfg, rng)
    types = [t for t in CONVERSATION_TYPES if conv[t]]
    rng.shuffle(types)
    picked = [rng.choice(conv[t]) for t in types[: cfg.conversation_turns]]
    if cfg.position_contrast:
        picked += [qa for qa in same_shape_position_qas(scene, conv["position"]) if qa not in picked]
    records = [{"id": f"conv-{scene.scene_id}", "image": image, "conversations": _turns(picked, prefix)}]
    if rng.random() < cfg.detail_fraction:
        detail = [
            {"from": "human", "value": prefix + rng.choice(DETAIL_PROMPTS)},
            {"from": "gpt", "value": detailed_description(scene)},
        ]
        records.append({"id": f"detail-{scene.scene_id}", "image": image, "conversations": detail})
    reasoning = [qa for qas in reasoning_qas(scene, cfg).values() for qa in qas]
    if reasoning and rng.random() < cfg.complex_fraction:
        picked = rng.sample(reasoning, k=min(2, len(reasoning)))
        records.append(
            {"id": f"complex-{scene.scene_id}", "image": image, "conversations": _turns(picked, prefix)}
        )
    return records


def text_only_qas(cfg: WorldConfig, rng: random.Random) -> list[tuple[str, str]]:
    """General questions about the world that need no image (LLaVA mixes in text-only instruction data)."""
    sides = {
        "circle": "A circle has no corners; it is round.",
        "square": "A square has 4 sides.",
        "triangle": "A triangle has 3 sides.",
    }
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    qas = [(f"How many sides does {article(s)} {s} have?", sides[s]) for s in cfg.shapes]
    qas += [(f"What is the opposite of {a}?", f"The opposite of {a} is {b}.") for a, b in opposite.items()]
    qas += [
        (
            "Which colors can the shapes have?",
            f"The shapes can be {join_words(sorted(cfg.palette)).replace(' and ', ' or ')}.",
        ),
        (
            "Which shapes can appear in a picture?",
            f"A picture can show {join_words([s + 's' for s in cfg.shapes])}.",
        ),
    ]
    qas += [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(4) for b in range(4)]
    qas += [(f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.") for a in range(4) for b in range(a + 1)]
    rng.shuffle(qas)
    return qas


def text_only_records(n: int, cfg: WorldConfig, rng: random.Random) -> list[dict]:
    """`n` text-only stage-2 records (no `image` field), one or two turns each."""
    pool = text_only_qas(cfg, rng)
    records = []
    for i in range(n):
        qas = rng.sample(pool, k=rng.choice([1, 2]))
        turns = []
        for q, a in qas:
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        records.append({"id": f"text-{i:06d}", "conversations": turns})
    return records


def exist_reading_records(
    scenes: list[Scene], n: int, cfg: WorldConfig, rng: random.Random, turns: int = 4
) -> list[dict]:
    """`n` text-only stage-2 records that give a scene in words (its caption) and ask existence questions about it.

    The existence answer names the colors of the asked shape, then compares them with the asked color ("The
    square is blue, so no."). The look-up is what the image is for; the comparison is text alone, and it is what
    stage 2 learned least reliably (runs that named the right colors gave the opposite verdict in a quarter to
    a third of their answers). These records practise the comparison on a scene the text states, as LLaVA's
    text-only instruction data practises language skills, without an image's 49 tokens per sample.
    """
    records = []
    for i in range(n):
        scene = rng.choice(scenes)
        asked: dict[str, QA] = {}
        for _ in range(3 * turns):  # distinct questions; a one-object scene may offer fewer
            qa = exist_qa(scene, cfg, rng)
            asked.setdefault(qa.question, qa)
            if len(asked) == turns:
                break
        record = {
            "id": f"read-{i:06d}",
            "conversations": _turns(list(asked.values()), f"{caption(scene)}.\n"),
        }
        records.append(record)
    return records


def eval_questions(
    scenes: list[Scene], cfg: WorldConfig, rng: random.Random
) -> tuple[list[dict], list[dict]]:
    """Held-out questions (official LLaVA question format) and their gold answers, `eval_questions_per_type` per type.

    Per type, at most one question per scene is taken, from scenes in shuffled order, so each type's questions
    are spread over as many scenes as possible.
    """
    per_scene = [(s, all_qas(s, cfg, rng)) for s in scenes]
    questions, gold = [], []
    for category in QUESTION_TYPES:
        order = list(range(len(per_scene)))
        rng.shuffle(order)
        taken = 0
        for i in order:
            scene, qas = per_scene[i]
            if taken == cfg.eval_questions_per_type:
                break
            if not qas[category]:
                continue
            qa = rng.choice(qas[category])
            qid = len(questions)
            image = f"{scene.scene_id}.png"
            questions.append({"question_id": qid, "image": image, "text": qa.question, "category": category})
            gold.append(
                {
                    "question_id": qid,
                    "category": category,
                    "image": image,
                    "scene_id": scene.scene_id,
                    "question": qa.question,
                    "answer": qa.answer,
                    "key": qa.key,
                    "candidates": list(qa.candidates),
                }
            )
            taken += 1
    return questions, gold


def lm_documents(scenes: list[Scene], cfg: WorldConfig, rng: random.Random, eos: str = "</s>") -> list[str]:
    """Text-only documents for the tokenizer and the tiny LLaMA, each ending with `eos`.

    Captions (in all four `CAPTION_FORMS` orders), detailed descriptions, and chats with
    questions of every type rendered as the Vicuna v1 template renders them (system prompt, "USER: ...
    ASSISTANT: ...", `eos` after each answer), so the pretrained LM already knows the prompt format and the
    caption orders, and the tokenizer has pieces for the system prompt (instead of ~150 byte-fallback tokens
    per sample, for runs that keep it).
    """
    docs: list[str] = []
    for scene in scenes:
        docs.append(caption(scene, rng.randrange(len(CAPTION_FORMS))) + eos)
        docs.append(detailed_description(scene) + eos)
        qas = [qa for group in all_qas(scene, cfg, rng).values() for qa in group]
        rng.shuffle(qas)
        turns = [f"USER: {qa.question} ASSISTANT: {qa.answer}{eos}" for qa in qas[: cfg.conversation_turns]]
        docs.append(f"{VICUNA_SYSTEM} " + "".join(turns))
    for q, a in text_only_qas(cfg, rng):
        docs.append(f"{VICUNA_SYSTEM} USER: {q} ASSISTANT: {a}{eos}")
    rng.shuffle(docs)
    return docs
