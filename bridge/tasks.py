"""Classification tasks: label names, verbalizers, the receiver primer and the prompts of the baselines.

A task is data, not code: every path (bridge, text relay, zero-shot, few-shot) reads the same TaskSpec so
that the comparison between them is fair (same verbalizers, same label scoring).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...]  # label names in index order (data/<task>/labels.json)
    verbalizers: tuple[str, ...]  # words scored by the receiver; first token of each must be distinct
    primer: str  # what the receiver reads before the soft tokens, e.g. "Topic:"
    instruction: str  # zero-shot / text-path instruction listing the options
    input_name: str  # "Article", "Question", "Review"
    answer_prefix: str  # text right before the label word in prompts, e.g. "Topic:"
    relay_instruction: str  # task-aware instruction for the sender's relay text

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def text_prompt(self, text: str) -> str:
        """Prompt a model reads to classify `text` directly (zero-shot, and the text path's receiver)."""
        return f"{self.instruction}\n{self.input_name}: {text}\n{self.answer_prefix}"

    def few_shot_prompt(self, shots: list[tuple[str, int]], text: str) -> str:
        demos = "".join(
            f"{self.input_name}: {shot_text}\n{self.answer_prefix}{self.verbalizers[label]}\n\n" for shot_text, label in shots
        )
        return f"{self.instruction}\n\n{demos}{self.input_name}: {text}\n{self.answer_prefix}"

    def relay_message(self, text: str) -> str:
        """User message for the sender when it writes the relay text (chat template applied by the model)."""
        return f"{self.relay_instruction}\n{self.input_name}: {text}"

    def relay_prompt_for_receiver(self, relay_text: str) -> str:
        """The receiver on the text path sees only the sender's relay text, never the original input."""
        return f"{self.instruction}\nSummary: {relay_text.strip()}\n{self.answer_prefix}"


TASKS: dict[str, TaskSpec] = {
    "ag_news": TaskSpec(
        name="ag_news",
        labels=("World", "Sports", "Business", "Sci/Tech"),
        verbalizers=(" world", " sports", " business", " technology"),
        primer="Topic:",
        instruction="Classify the news article as world, sports, business or technology.",
        input_name="Article",
        answer_prefix="Topic:",
        relay_instruction=(
            "In one short sentence, say what this news article is about and whether its topic is "
            "world news, sports, business or science/technology."
        ),
    ),
    "trec": TaskSpec(
        name="trec",
        labels=("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
        verbalizers=(" abbreviation", " description", " entity", " human", " location", " number"),
        primer="Answer type:",
        instruction=(
            "Classify what kind of answer the question asks for: abbreviation, description, entity, "
            "human, location or number."
        ),
        input_name="Question",
        answer_prefix="Answer type:",
        relay_instruction=(
            "In one short sentence, restate this question and say whether its answer is an abbreviation, "
            "a description, an entity, a person, a location or a number."
        ),
    ),
    "sst2": TaskSpec(
        name="sst2",
        labels=("negative", "positive"),
        verbalizers=(" negative", " positive"),
        primer="Sentiment:",
        instruction="Classify the sentiment of the movie review as negative or positive.",
        input_name="Review",
        answer_prefix="Sentiment:",
        relay_instruction="In one short sentence, say what this movie review thinks and whether it is negative or positive.",
    ),
}


class UnknownTaskError(KeyError):
    def __init__(self, task: str):
        super().__init__(task)
        self.task = task

    def __str__(self) -> str:
        return f"unknown task {self.task!r}; known tasks: {', '.join(sorted(TASKS))}"


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(name) from None
