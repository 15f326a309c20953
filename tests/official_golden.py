"""The golden ids of the official LLaVA preprocessing (`data/golden/official_llava_preprocess.json`, see its
`provenance`) and the helpers that put our outputs in its terms."""

from __future__ import annotations

import json
from pathlib import Path

from llava_lit.constants import IMAGE_TOKEN
from llava_lit.qa_files import Question

GOLDEN = json.loads(
    (Path(__file__).parent / "data" / "golden" / "official_llava_preprocess.json").read_text()
)
"""`provenance`, `cases` (training samples) and `prompts` (the eval loaders' prompts), in both legacy modes."""

OFFICIAL_IMAGE = GOLDEN["provenance"]["image_token"]
"""The official code's image placeholder id (-200)."""

SCIENCE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def official_view(ids: list[int], tokenizer) -> list[int]:
    """Our ids with the image placeholder written as the official code writes it."""
    image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return [OFFICIAL_IMAGE if i == image else i for i in ids]


def question_for(line: dict, loader: str) -> Question:
    """The question our predict/eval path builds from an official question line of `loader`."""
    if loader == "model_vqa_loader":
        return Question(
            question_id=str(line["question_id"]), image=line["image"], text=line["text"], category=""
        )
    # What eval.scienceqa builds from llava_test_CQM-A.json for `--single-pred-prompt`.
    text = line["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip() + "\n" + SCIENCE_INSTRUCTION
    return Question(question_id=line["id"], image=line.get("image"), text=text, category="")


def case_id(entry: dict) -> str:
    """A readable test id for a golden case or prompt."""
    name = (
        entry.get("name") or f"{entry['loader']}-{entry['line'].get('question_id', entry['line'].get('id'))}"
    )
    return f"{name}-{'legacy' if entry['legacy'] else 'nonlegacy'}"
