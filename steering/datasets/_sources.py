"""Readers for the bundled prompt sets, the split rule and the harmless filter.

Everything here is private; the public API and the documentation live in
``steering/datasets/__init__.py``.  Nothing is read at import time: ``rows``
parses a set the first time it is asked for and caches it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

DATA_DIR = Path(__file__).parent / "data"

HASH_SPLITS = ("train", "val", "test")
TRAIN_FRACTION, VAL_FRACTION = 0.6, 0.2  # test gets the remaining 0.2
MAX_HARMLESS_CHARS = 400

# Words (with their common inflections) that make a "helpful" prompt borderline.
# Matched case-insensitively on word boundaries.  The list errs on the side of
# removing benign prompts ("How do you kill maggots?") rather than keeping a
# borderline one ("What are the main ingredients in meth?").
BORDERLINE_TERMS = (
    # drugs
    r"drugs?", r"meth", r"methamphetamine", r"cocaine", r"crack", r"heroin", r"fentanyl",
    r"opioids?", r"opium", r"lsd", r"mdma", r"ecstasy", r"marijuana", r"weed", r"cannabis",
    r"overdos(?:e|es|ed|ing)",
    # weapons
    r"weapons?", r"guns?", r"firearms?", r"rifles?", r"pistols?", r"ammo", r"ammunition",
    r"bombs?", r"explosives?", r"grenades?", r"napalm",
    # violence
    r"kill(?:s|ed|er|ers|ing)?", r"murder(?:s|ed|er|ers|ing)?", r"assault(?:s|ed|ing)?",
    r"shoot(?:s|ing)?", r"shot", r"stab(?:s|bed|bing)?", r"tortur(?:e|es|ed|ing)",
    r"kidnap(?:s|ped|ping)?", r"rap(?:e|es|ed|ist|ists)", r"abus(?:e|es|ed|ive|ing)",
    r"terroris(?:t|ts|m)", r"violen(?:t|ce)", r"beat up", r"punch(?:es|ed|ing)?",
    r"dead bod(?:y|ies)", r"corpses?",
    # crime
    r"steal(?:s|ing)?", r"stole(?:n)?", r"rob(?:s|bed|bing|bery|beries)?",
    r"shoplift(?:s|ed|ing)?", r"burglar(?:y|ies|s)?", r"hack(?:s|ed|er|ers|ing)?", r"fraud",
    r"scam(?:s|med|ming)?", r"counterfeit", r"launder(?:ing)?", r"smuggl(?:e|es|ed|ing)",
    r"illegal(?:ly)?", r"crimes?", r"criminal", r"blackmail", r"extort(?:ion)?",
    r"brib(?:e|es|ed|ery)", r"cheat(?:s|ed|ing)?", r"spy(?:ing)?", r"dox(?:x)?(?:ing)?",
    r"lock ?pick(?:s|ing)?", r"pick a lock", r"pranks?", r"revenge", r"harass(?:ment|ing|ed)?",
    r"bull(?:y|ies|ied|ying)",
    # hate and insults
    r"racis(?:t|ts|m)", r"sexis(?:t|ts|m)", r"nazis?", r"slurs?", r"insult(?:s|ed|ing)?",
    r"n-word", r"fuck\w*", r"shit\w*", r"bitch\w*", r"whores?",
    # sex
    r"porn(?:o|ography|ographic)?", r"sex", r"sexual(?:ly)?", r"sexy", r"nude", r"naked",
    r"prostitut(?:e|es|ion)", r"erotic",
    # self-harm and poison
    r"suicid(?:e|al)", r"self-harm", r"poison(?:s|ed|ing|ous)?",
)
_BORDERLINE = re.compile(r"\b(?:" + "|".join(BORDERLINE_TERMS) + r")\b", re.IGNORECASE)


def normalise(text: str) -> str:
    """Lower-case, strip and collapse runs of whitespace to one space."""
    return " ".join(text.lower().split())


def hash_split(text: str) -> str:
    """``train`` / ``val`` / ``test`` from the sha256 of the normalised text."""
    digest = hashlib.sha256(normalise(text).encode("utf-8")).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    if fraction < TRAIN_FRACTION:
        return "train"
    return "val" if fraction < TRAIN_FRACTION + VAL_FRACTION else "test"


def is_borderline(text: str) -> bool:
    """True if ``text`` contains one of ``BORDERLINE_TERMS`` as a whole word."""
    return _BORDERLINE.search(text) is not None


# --- file readers -------------------------------------------------------------


def _path(relative: str) -> Path:
    path = DATA_DIR / relative
    if not path.is_file():
        raise FileNotFoundError(f"bundled data file is missing: {path}")
    return path


def _csv(relative: str, column: str, keep: Callable[[dict], bool] = lambda row: True) -> list[str]:
    with _path(relative).open(encoding="utf-8", newline="") as f:
        return [row[column] for row in csv.DictReader(f) if keep(row)]


def _jsonl(relative: str) -> list[dict]:
    path = _path(relative)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _json(relative: str) -> list:
    with _path(relative).open(encoding="utf-8") as f:
        return json.load(f)


# --- the sets -------------------------------------------------------------------


def _harmbench() -> dict[str, list[str]]:
    def standard(row: dict) -> bool:
        return row["FunctionalCategory"] == "standard"

    return {
        split: _csv(f"harmbench/harmbench_behaviors_text_{split}.csv", "Behavior", standard)
        for split in ("val", "test")
    }


def _refusal_direction() -> dict[str, list[str]]:
    return {
        split: [item["instruction"] for item in _json(f"refusal_direction_splits/harmful_{split}.json")]
        for split in HASH_SPLITS
    }


def _xstest(label: str | None) -> list[str]:
    return _csv("xstest/xstest_prompts.csv", "prompt", lambda row: label in (None, row["label"]))


def _hh_rlhf() -> list[str]:
    prompts = []
    for part in ("helpful-base", "helpful-online", "helpful-rejection-sampled"):
        for dialogue in _jsonl(f"harmless/hh-rlhf/{part}_test.jsonl.gz"):
            chosen = dialogue["chosen"]
            start = chosen.index("\n\nHuman: ") + len("\n\nHuman: ")
            prompts.append(chosen[start : chosen.index("\n\nAssistant:", start)])
    return [p for p in prompts if not is_borderline(p)]


def _self_instruct() -> list[str]:
    tasks = _jsonl("harmless/self-instruct/seed_tasks.jsonl")
    tasks += _jsonl("harmless/self-instruct/user_oriented_instructions.jsonl")
    return [t["instruction"] for t in tasks if not t["instances"][0]["input"].strip()]


def _first_turns(relative: str) -> list[str]:
    return [question["turns"][0] for question in _jsonl(relative)]


HARMFUL_POOL = ("advbench", "harmbench", "jailbreakbench", "refusal_direction")
HARMLESS_POOL = ("hh_rlhf", "self_instruct", "ifeval", "mt_bench", "vicuna", "arena_hard")


def _harmful() -> list[str]:
    return [p for name in HARMFUL_POOL for p in rows(name)["all"]]


def _harmless() -> list[str]:
    harmful = {normalise(p) for p in rows("harmful")["all"]}
    return [
        p
        for name in HARMLESS_POOL
        for p in rows(name)["all"]
        if len(p) <= MAX_HARMLESS_CHARS and not is_borderline(p) and normalise(p) not in harmful
    ]


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: str  # "harmful", "harmless" or "mixed"
    description: str
    source: str
    licence: str
    read: Callable[[], list[str] | dict[str, list[str]]]
    official_splits: tuple[str, ...] = ()  # empty: hash split into HASH_SPLITS

    @property
    def splits(self) -> tuple[str, ...]:
        return self.official_splits or HASH_SPLITS


_MIT_LLM_ATTACKS = "MIT (llm-attacks); carrying repo andyrdt/refusal_direction: Apache-2.0"
_XSTEST = "paul-rottger/exaggerated-safety @ d7bb5bd7: xstest_prompts.csv"

DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset("advbench", "harmful", "AdvBench harmful behaviours (goal column)",
                "llm-attacks/llm-attacks data/advbench/harmful_behaviors.csv, via "
                "andyrdt/refusal_direction @ 9d852fae", _MIT_LLM_ATTACKS,
                lambda: _csv("advbench/advbench.csv", "goal")),
        Dataset("harmbench", "harmful", "HarmBench standard text behaviours (contextual and "
                "copyright behaviours left out); official val/test files",
                "centerforaisafety/HarmBench, via busycalibrating/AdversariaLLM @ a4b57364",
                "MIT (c) 2024 centerforaisafety", _harmbench, ("val", "test")),
        Dataset("jailbreakbench", "harmful", "JailbreakBench harmful behaviours (Goal column)",
                "JailbreakBench/jailbreakbench behaviors.csv (June 2024), via "
                "andyrdt/refusal_direction @ 9d852fae", "MIT (JailbreakBench)",
                lambda: _csv("jailbreakbench/jailbreakbench.csv", "Goal")),
        Dataset("refusal_direction", "harmful", "harmful instructions of Arditi et al. (2024), "
                "official train/val/test splits (AdvBench, MaliciousInstruct, TDC2023, HarmBench, "
                "JailbreakBench, StrongREJECT)", "andyrdt/refusal_direction @ 9d852fae: dataset/splits",
                "Apache-2.0 (repo); each upstream source keeps its own licence",
                _refusal_direction, HASH_SPLITS),
        Dataset("harmful", "harmful", "pool: advbench + harmbench + jailbreakbench + "
                "refusal_direction, deduplicated", "see the pooled sets", "see the pooled sets",
                _harmful),
        Dataset("xstest", "mixed", "XSTest: 250 safe prompts that look unsafe + 200 unsafe "
                "contrast prompts", _XSTEST, "CC-BY-4.0", lambda: _xstest(None)),
        Dataset("xstest:safe", "harmless", "XSTest safe prompts (label == safe)", _XSTEST,
                "CC-BY-4.0", lambda: _xstest("safe")),
        Dataset("xstest:unsafe", "harmful", "XSTest unsafe contrast_* prompts (label == unsafe)",
                _XSTEST, "CC-BY-4.0", lambda: _xstest("unsafe")),
        Dataset("hh_rlhf", "harmless", "Anthropic hh-rlhf helpful-{base,online,rejection-sampled} "
                "test: first human turns, keyword-filtered", "anthropics/hh-rlhf, via "
                "DaehanKim/EasyRLHF @ 45eccb72", "MIT (c) 2022 Anthropic", _hh_rlhf),
        Dataset("self_instruct", "harmless", "self-instruct seed and user-oriented instructions "
                "that need no input", "yizhongw/self-instruct @ 0b26ccaa", "Apache-2.0",
                _self_instruct),
        Dataset("ifeval", "harmless", "IFEval prompts (with format constraints)",
                "google-research instruction_following_eval, via Podtech-AI/IFEval @ 5bdf377e",
                "Apache-2.0",
                lambda: [r["prompt"] for r in _jsonl("harmless/ifeval/input_data.jsonl")]),
        Dataset("mt_bench", "harmless", "MT-bench first turns", "lm-sys/FastChat @ 0e6d3e4b",
                "Apache-2.0",
                lambda: _first_turns("harmless/fastchat_llm_judge/mt_bench_question.jsonl")),
        Dataset("vicuna", "harmless", "Vicuna bench questions", "lm-sys/FastChat @ 0e6d3e4b",
                "Apache-2.0",
                lambda: _first_turns("harmless/fastchat_llm_judge/vicuna_bench_question.jsonl")),
        Dataset("arena_hard", "harmless", "Arena-Hard-Auto v0.1 prompts",
                "lmarena/arena-hard-auto @ 196f6b82", "Apache-2.0",
                lambda: [r["prompt"] for r in
                         _jsonl("harmless/arena-hard-auto/arena-hard-v0.1_question.jsonl")]),
        Dataset("harmless", "harmless", f"pool: hh_rlhf + self_instruct + ifeval + mt_bench + "
                f"vicuna + arena_hard, deduplicated, without borderline prompts, prompts longer "
                f"than {MAX_HARMLESS_CHARS} characters and prompts of the harmful pool",
                "see the pooled sets", "see the pooled sets", _harmless),
    )
}


def _dedupe(prompts: Iterable[str], seen: set[str]) -> list[str]:
    """Stripped, non-empty prompts whose normalised text is not in ``seen`` (updated)."""
    kept = []
    for prompt in prompts:
        key = normalise(prompt)
        if key and key not in seen:
            seen.add(key)
            kept.append(prompt.strip())
    return kept


@lru_cache(maxsize=None)
def rows(name: str) -> dict[str, tuple[str, ...]]:
    """``{"all": ..., <split>: ...}`` for a registered set, parsed once and cached."""
    dataset = DATASETS[name]
    data = dataset.read()
    seen: set[str] = set()
    if dataset.official_splits:
        # A prompt listed in several official splits stays in the first one only.
        out = {split: tuple(_dedupe(data[split], seen)) for split in dataset.official_splits}
        return {"all": tuple(p for split in out.values() for p in split), **out}
    everything = tuple(_dedupe(data, seen))
    by_split = {split: tuple(p for p in everything if hash_split(p) == split) for split in HASH_SPLITS}
    return {"all": everything, **by_split}
