"""Captions, questions and answers are derived correctly from the ground truth."""

from __future__ import annotations

import random

from llava_lit.world.config import WorldConfig
from llava_lit.world.dialogues import (
    CAPTION_FORMS,
    POSITION_PHRASES,
    QUESTION_TYPES,
    align_record,
    all_qas,
    caption,
    detailed_description,
    eval_questions,
    exist_reading_records,
    finetune_records,
    lm_documents,
    text_only_records,
)
from llava_lit.world.scenes import Scene, SceneObject, generate_scene_sets
from llava_lit.world.score import is_correct

CFG = WorldConfig.ci()


def obj(shape, color, position, size="small"):
    return SceneObject(shape=shape, color=color, size=size, position=position, cx=0.5, cy=0.5)


SCENE = Scene(
    scene_id="t-0",
    background="gray",
    background_rgb=(128, 128, 128),
    objects=(
        obj("circle", "red", "left"),
        obj("square", "blue", "right"),
        obj("circle", "orange", "top", "large"),
    ),
)


def by_question(qas):
    return {qa.question: qa for group in qas.values() for qa in group}


def test_caption_and_description():
    two = Scene("t-1", "white", (246, 246, 246), SCENE.objects[:2])
    assert caption(two) == "a red circle on the left and a blue square on the right"
    assert (
        caption(SCENE)
        == "an orange circle at the top, a red circle on the left and a blue square on the right"
    )
    assert caption(two, 1) == "on the left a red circle and on the right a blue square"
    assert caption(two, 2) == "a circle in red on the left and a square in blue on the right"
    assert caption(two, 3) == "on the left a circle in red and on the right a square in blue"
    text = detailed_description(SCENE)
    assert text.startswith("The image shows 3 shapes on a gray background.")
    assert "There is a large orange circle at the top." in text


def test_every_question_form_with_its_answer():
    qas = by_question(all_qas(SCENE, CFG, random.Random(0)))
    expected = {
        "What color is the square?": ("color", "blue", "The square is blue."),
        "What shape is the red object?": ("shape", "circle", "The red object is a circle."),
        "What shape is the blue object?": ("shape", "square", "The blue object is a square."),
        "How many shapes are there?": ("count", "3", "There are 3 shapes."),
        "Where is the red circle?": ("position", "left", "The red circle is on the left."),
        "Where is the orange circle?": ("position", "top", "The orange circle is at the top."),
        "Which shape is closest to the top?": (
            "closest",
            "orange circle",
            "The orange circle is closest to the top.",
        ),
        "Which shape is closest to the left?": (
            "closest",
            "red circle",
            "The red circle is closest to the left.",
        ),
        "If the red shape were removed, how many shapes would remain?": (
            "remove",
            "2",
            "Without the red circle, 2 shapes would remain.",
        ),
    }
    for question, (category, key, answer) in expected.items():
        qa = qas[question]
        assert (qa.category, qa.key, qa.answer) == (category, key, answer)
        assert is_correct({"category": category, "key": key, "candidates": list(qa.candidates)}, qa.answer)
    # Two circles: "What color is the circle?" would be ambiguous, so it is never asked.
    assert "What color is the circle?" not in qas
    # "Closest to the bottom": left and right tie, so it is not asked either.
    assert "Which shape is closest to the bottom?" not in qas


def test_existence_yes_and_no():
    answers = {}
    for seed in range(80):
        qa = all_qas(SCENE, CFG, random.Random(seed))["exist"][0]
        color, shape = qa.question.removeprefix("Is there ").rstrip("?").split(" ")[-2:]
        present = (color, shape) in {(o.color, o.shape) for o in SCENE.objects}
        assert qa.key == ("yes" if present else "no")
        assert qa.answer.endswith(f", so {qa.key}.")  # the verdict comes last
        assert is_correct({"category": "exist", "key": qa.key, "candidates": ["yes", "no"]}, qa.answer)
        answers[qa.question] = qa.answer
    # First the colors of the objects of the asked shape, in reading order (top, left, center, right, bottom).
    assert answers["Is there a red circle?"] == "The circles are orange and red, so yes."
    assert answers["Is there a green circle?"] == "The circles are orange and red, so no."
    assert answers["Is there a blue square?"] == "The square is blue, so yes."
    assert answers["Is there a red square?"] == "The square is blue, so no."
    assert answers["Is there a red triangle?"] == "There is no triangle, so no."


def test_existence_negatives_mostly_name_a_shape_the_scene_holds():
    """40 % yes, 40 % no for a present shape in another color, 20 % no for an absent shape: answering "yes"
    whenever the asked shape is there must not pay (it would score 60 %)."""
    kinds = {"yes": 0, "shape here": 0, "shape absent": 0}
    shapes_here = {o.shape for o in SCENE.objects}
    for seed in range(2000):
        qa = all_qas(SCENE, CFG, random.Random(seed))["exist"][0]
        shape = qa.question.rstrip("?").split(" ")[-1]
        kinds["yes" if qa.key == "yes" else "shape here" if shape in shapes_here else "shape absent"] += 1
    assert abs(kinds["yes"] / 2000 - 0.4) < 0.04, kinds
    assert abs(kinds["shape here"] / 2000 - 0.4) < 0.04, kinds
    assert abs(kinds["shape absent"] / 2000 - 0.2) < 0.04, kinds


def test_exist_reading_records_state_the_scene_and_answer_from_it():
    scenes = generate_scene_sets(CFG)["train"][:40]
    records = exist_reading_records(scenes, 60, CFG, random.Random(0))
    assert len(records) == 60 and len({r["id"] for r in records}) == 60
    captions = {caption(s): s for s in scenes}
    for r in records:
        assert "image" not in r  # text only
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        stated, first = turns[0]["value"].split(".\n")
        scene = captions[stated]  # the scene in words, then the first question
        present = {(o.color, o.shape) for o in scene.objects}
        questions = [first] + [t["value"] for t in turns[2::2]]
        assert 1 <= len(questions) == len(set(questions)) <= 4
        for question, answer in zip(questions, [t["value"] for t in turns[1::2]], strict=True):
            assert question.startswith("Is there ")
            color, shape = question.removesuffix("?").split(" ")[-2:]
            assert answer == expected_exist_answer(scene, color, shape)
            assert answer.endswith(", so yes." if (color, shape) in present else ", so no.")


def expected_exist_answer(scene, color, shape):
    """The answer to "Is there a {color} {shape}?" about `scene`, written out from its objects in reading order."""
    order = ["top", "left", "center", "right", "bottom"]
    colors = [
        o.color for o in sorted(scene.objects, key=lambda o: order.index(o.position)) if o.shape == shape
    ]
    verdict = "yes" if color in colors else "no"
    if not colors:
        return f"There is no {shape}, so no."
    if len(colors) == 1:
        return f"The {shape} is {colors[0]}, so {verdict}."
    return f"The {shape}s are {', '.join(colors[:-1])} and {colors[-1]}, so {verdict}."


def test_conversations_ask_where_each_object_of_a_shared_shape_is():
    """Both circles of SCENE are asked about in every conversation (once each); a scene of unique shapes adds none."""
    for seed in range(30):
        conv = finetune_records(SCENE, "train/t-0.png", CFG, random.Random(seed))[0]["conversations"]
        questions = [t["value"].removeprefix("<image>\n") for t in conv[::2]]
        answers = dict(zip(questions, [t["value"] for t in conv[1::2]], strict=True))
        assert answers["Where is the red circle?"] == "The red circle is on the left."
        assert answers["Where is the orange circle?"] == "The orange circle is at the top."
        assert len(questions) == len(set(questions))
        assert sum(q.startswith("Where is the") for q in questions) <= 3
    unique = Scene(
        "t-3", "gray", (128, 128, 128), (obj("circle", "red", "left"), obj("square", "blue", "top"))
    )
    for seed in range(30):
        plain = WorldConfig.ci(position_contrast=False)
        with_contrast = finetune_records(unique, "x.png", CFG, random.Random(seed))
        assert with_contrast == finetune_records(unique, "x.png", plain, random.Random(seed))
        # With a shared shape the added turns draw nothing: the records that follow are unchanged.
        rng, plain_rng = random.Random(seed), random.Random(seed)
        finetune_records(SCENE, "x.png", CFG, rng)
        finetune_records(SCENE, "x.png", plain, plain_rng)
        assert rng.random() == plain_rng.random()


def test_single_object_scene_counts_and_articles():
    one = Scene("t-2", "black", (18, 18, 18), (obj("triangle", "orange", "center"),))
    qas = by_question(all_qas(one, CFG, random.Random(0)))
    assert qas["How many shapes are there?"].answer == "There is 1 shape."
    assert qas["What color is the triangle?"].answer == "The triangle is orange."
    assert qas["Where is the orange triangle?"].answer == "The orange triangle is in the center."
    assert qas["If the orange shape were removed, how many shapes would remain?"].key == "0"
    assert not any(q.startswith("Which shape is closest") for q in qas)


def test_align_captions_use_the_first_order_unless_mixed():
    """One phrase form by default; the setting changes only the caption, never the later random draws."""
    for seed in range(10):
        plain, mixed = random.Random(seed), random.Random(seed)
        one = align_record(SCENE, "x.png", plain)
        four = align_record(SCENE, "x.png", mixed, mixed_orders=True)
        assert one["conversations"][1]["value"] == "\n" + caption(SCENE, 0)  # on its own line after the image
        assert one["conversations"][0] == four["conversations"][0]
        assert plain.random() == mixed.random()


def test_mixed_align_captions_vary_the_word_order():
    """With mixed orders each attribute leads in some captions."""
    captions = [
        align_record(SCENE, "x.png", random.Random(seed), mixed_orders=True)["conversations"][1][
            "value"
        ].lstrip("\n")
        for seed in range(40)
    ]
    assert set(captions) == {caption(SCENE, f) for f in range(len(CAPTION_FORMS))}
    first_words = {c.split()[1] if c.startswith(("a ", "an ")) else c.split()[0] for c in captions}
    assert first_words == {"orange", "circle", "at"}  # color, shape and position each lead in some form
    for c in captions:  # every form names every attribute of every object
        for o in SCENE.objects:
            assert o.color in c and o.shape in c and POSITION_PHRASES[o.position] in c


def test_records_are_llava_format():
    rng = random.Random(0)
    rec = align_record(SCENE, "train/t-0.png", rng)
    assert rec["image"] == "train/t-0.png"
    assert rec["conversations"][0]["value"].startswith("<image>\n")
    assert rec["conversations"][1]["from"] == "gpt"
    assert rec["conversations"][1]["value"] in {"\n" + caption(SCENE, f) for f in range(len(CAPTION_FORMS))}
    kinds = set()
    for seed in range(20):
        for r in finetune_records(SCENE, "train/t-0.png", CFG, random.Random(seed)):
            kinds.add(r["id"].split("-")[0])
            turns = r["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert sum("<image>" in t["value"] for t in turns) == 1
    assert kinds == {"conv", "detail", "complex"}
    for r in text_only_records(10, CFG, random.Random(0)):
        assert "image" not in r and all("<image>" not in t["value"] for t in r["conversations"])


def test_eval_questions_cover_every_type_on_held_out_scenes():
    sets = generate_scene_sets(WorldConfig.ci(n_eval_scenes=80))
    questions, gold = eval_questions(sets["eval"], CFG, random.Random(0))
    assert [q["question_id"] for q in questions] == [g["question_id"] for g in gold]
    assert {q["category"] for q in questions} == set(QUESTION_TYPES)
    for category in QUESTION_TYPES:
        assert sum(q["category"] == category for q in questions) == CFG.eval_questions_per_type
    eval_ids = {s.scene_id for s in sets["eval"]}
    assert all(g["scene_id"] in eval_ids and g["image"] == g["scene_id"] + ".png" for g in gold)
    assert all(is_correct(g, g["answer"]) for g in gold)
    assert all(set(q) == {"question_id", "image", "text", "category"} for q in questions)


def test_lm_documents_use_the_vicuna_format():
    sets = generate_scene_sets(WorldConfig.ci(n_train_scenes=20))
    docs = lm_documents(sets["train"], CFG, random.Random(0))
    chats = [d for d in docs if "USER: " in d]
    assert chats and all(d.startswith("A chat between") and d.endswith("</s>") for d in chats)
    assert all(d.endswith("</s>") for d in docs)


def test_lm_captions_use_every_word_order():
    """The LM text teaches all four orders, so the LLM knows that any attribute may lead."""
    scenes = generate_scene_sets(WorldConfig.ci(n_train_scenes=40))["train"]
    docs = set(lm_documents(scenes, CFG, random.Random(0)))
    used = {f for f in range(len(CAPTION_FORMS)) for s in scenes if caption(s, f) + "</s>" in docs}
    assert used == set(range(len(CAPTION_FORMS)))


def test_reading_records_leave_every_other_record_and_the_rng_alone(tmp_path):
    """The reading records come from their own random stream: the image records, the other text-only records
    and every later draw (the held-out questions) are those of a world without them."""
    from llava_lit.world.build import _write_records

    scenes = generate_scene_sets(CFG)
    written, states = {}, {}
    for fraction in (0.0, 0.2):
        rng = random.Random(0)
        cfg = WorldConfig.ci(exist_reading_fraction=fraction)
        written[fraction] = _write_records(scenes, cfg, tmp_path / str(fraction), rng)
        states[fraction] = rng.getstate()
    assert states[0.0] == states[0.2]
    for name in ("finetune", "val_finetune"):
        with_reading = written[0.2][name]
        reading = [r for r in with_reading if r["id"].removeprefix("val_").startswith("read-")]
        assert [r for r in with_reading if r not in reading] == written[0.0][name]
        assert abs(len(reading) / len(with_reading) - 0.2) < 0.01
